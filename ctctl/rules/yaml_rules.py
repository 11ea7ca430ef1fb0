"""Rules in YAML: a list of tc lines, the same syntax as the command line.

    rules:
      - filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state -trk action ct action goto chain 9
      - dev eth5 protocol ip chain 9 flower ct_state +trk+est action mirred egress redirect dev eth6

Lines are written as they would be typed: an unquoted line holding
"parent ffff: chain 0" is, for YAML, a mapping; it is read back as the text
it was.  Errors are "PATH:LINE:COLUMN: message", the column pointing at the token in
the file when the rule is written on one line (plain or quoted), else at the
rule's first character with the column inside the rule in the message.
"""

from __future__ import annotations

import yaml

from .errors import RuleSyntaxError
from .model import Filter
from .parser import parse_filter
from .ruleset import RuleSet


class RulesFileError(ValueError):
    def __init__(self, where: str, msg: str, token: str | None = None):
        self.where = where
        self.token = token
        super().__init__(f"{where}: {msg}")


def _where(path: str, node: yaml.Node, column: int | None = None) -> str:
    m = node.start_mark
    col = m.column + 1 if column is None else column
    return f"{path}:{m.line + 1}:{col}"


def _plain_mapping_line(item: yaml.Node) -> str | None:
    """`- tc filter add ... parent ffff: chain 0 ...` unquoted is, to YAML,
    a one-pair mapping split at "ffff: ".  The rule is the source text as
    written; recover it when the item is on one line."""
    if not isinstance(item, yaml.MappingNode) or item.flow_style or len(item.value) != 1:
        return None
    k, v = item.value[0]
    if not (isinstance(k, yaml.ScalarNode) and isinstance(v, yaml.ScalarNode)
            and k.style is None and v.style is None):
        return None
    start, end = item.start_mark, v.end_mark
    if start.buffer is None or start.line != end.line:
        return None
    return start.buffer[start.pointer:end.pointer]


def _rule_error(path: str, node: yaml.Node, e: RuleSyntaxError, verbatim: bool) -> RulesFileError:
    start, end = node.start_mark, node.end_mark
    if e.column is not None and verbatim:
        return RulesFileError(_where(path, node, start.column + e.column), e.message, e.token)
    # A plain scalar is the text as written; a quoted one is shifted by the
    # quote.  Escapes in double quotes would move columns: only trust the
    # mapping when the source text between the marks equals the value.
    if (e.column is not None and isinstance(node, yaml.ScalarNode) and start.line == end.line
            and node.style in (None, "'", '"')):
        quote = 0 if node.style is None else 1
        src = start.buffer[start.pointer + quote:end.pointer - quote] if start.buffer else None
        if src == node.value:
            return RulesFileError(_where(path, node, start.column + quote + e.column),
                                  e.message, e.token)
    msg = str(e) + " of the rule" if e.column is not None else e.message
    return RulesFileError(_where(path, node), msg, e.token)


def rules_from_node(node: yaml.Node, path: str = "<rules>") -> list[Filter]:
    """The filters of a YAML sequence node of tc lines (for a config file
    that holds rules under one of its keys)."""
    return [f for f, _ in _with_nodes(node, path)]


def _with_nodes(node: yaml.Node, path: str) -> list[tuple[Filter, yaml.Node]]:
    if not isinstance(node, yaml.SequenceNode):
        raise RulesFileError(_where(path, node), "rules must be a list of tc lines")
    out = []
    for item in node.value:
        text = _plain_mapping_line(item)
        verbatim = text is not None
        if text is None:
            if not isinstance(item, yaml.ScalarNode) or item.tag != "tag:yaml.org,2002:str":
                raise RulesFileError(_where(path, item), "each rule must be one tc line (a string)")
            text = item.value
        try:
            out.append((parse_filter(text), item))
        except RuleSyntaxError as e:
            raise _rule_error(path, item, e, verbatim) from None
    return out


def _root_list(text: str, path: str, key: str) -> yaml.Node | None:
    try:
        root = yaml.compose(text)
    except yaml.MarkedYAMLError as e:
        m = e.problem_mark
        where = f"{path}:{m.line + 1}:{m.column + 1}" if m else path
        raise RulesFileError(where, f"YAML syntax error: {e.problem}") from None
    if root is None:
        return None
    if isinstance(root, yaml.MappingNode):
        for knode, vnode in root.value:
            if isinstance(knode, yaml.ScalarNode) and knode.value == key:
                if isinstance(vnode, yaml.ScalarNode) and vnode.tag.endswith(":null"):
                    return None
                return vnode
        raise RulesFileError(_where(path, root), f"no '{key}:' list in the document")
    return root


def load_rules(text: str, path: str = "<rules>", key: str = "rules") -> list[Filter]:
    """The filters of a YAML document: a mapping with `key:` holding the
    list, or the list itself at the top."""
    node = _root_list(text, path, key)
    return [] if node is None else rules_from_node(node, path)


def load_ruleset(text: str, path: str = "<rules>", key: str = "rules") -> RuleSet:
    """A RuleSet from YAML; a filter the set refuses (same handle twice,
    mixed protocols at one prio) is reported at its line."""
    node = _root_list(text, path, key)
    rs = RuleSet()
    for f, item in ([] if node is None else _with_nodes(node, path)):
        try:
            rs.add(f)
        except RuleSyntaxError as e:
            raise RulesFileError(_where(path, item), e.message) from None
    return rs
