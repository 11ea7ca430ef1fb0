"""The filters of a box: per ingress device, per chain, in tc's order.

Ordering and default numbering follow the kernel (net/sched/cls_api.c):
- a chain runs its filters by ascending prio; filters sharing a prio (one
  flower instance in the kernel) run in the order they were added;
- a filter added without prio gets tcf_auto_prio(): 0xC000 (49152) in an
  empty chain, otherwise one less than the chain's current first (lowest)
  prio, so it runs *before* the filters already there;
- a filter added without handle gets the next free handle of its
  (chain, prio), from 1 (flower allocates handles per instance);
- two filters at the same prio must have the same protocol (tc refuses
  "mismatched protocol" with EINVAL), and a handle is unique per prio;
- every action has an index among the actions of its kind (ct, mirred,
  gact), one space for the whole box as for a network namespace: an action
  added without one gets the lowest free index; one added with the index
  of an existing action of its kind is bound to that action, whose
  parameters it then has (the kernel ignores the new ones on bind).

A filter is validated before anything changes: a refused add leaves the
set as it was.  Per-filter packet and byte counters live here, so that
`filter show -s` and the pipeline agree on them.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from . import validate as _validate
from .errors import RuleSyntaxError
from .model import DEFAULT_PRIO, U32, Action, Filter
from .printer import format_action, format_filter


@dataclass
class FilterStats:
    packets: int = 0
    bytes: int = 0


@dataclass
class _Entry:
    filter: Filter
    seq: int
    stats: FilterStats
    indices: tuple[int, ...] = ()   # each action's index, given or assigned
    notes: list[str] = dataclasses.field(default_factory=list)   # what add() did besides adding


class RuleSet:
    def __init__(self, filters: list[Filter] | None = None):
        # dev -> chain -> entries, kept sorted by (prio, seq)
        self._chains: dict[str, dict[int, list[_Entry]]] = {}
        self._seq = itertools.count()
        # Each action by (kind, index) with how many filters hold it, and
        # per kind an index below which all are taken: kept as filters come
        # and go, so that adding one does not walk all the others.
        self._held: dict[tuple[str, int], list] = {}     # -> [action, holders]
        self._low: dict[str, int] = {}
        for f in filters or ():
            self.add(f)

    # -- changes ---------------------------------------------------------
    def add(self, f: Filter) -> Filter:
        """Add a filter; returns it with prio and handle filled in."""
        _validate.validate(f)
        entries = self._chains.get(f.dev, {}).get(f.chain, [])
        prio = f.prio
        if prio is None:
            prio = entries[0].filter.prio - 1 if entries else DEFAULT_PRIO
            if prio < 1:
                raise RuleSyntaxError(f"filter: no free priority below {prio + 1} "
                                      f"in chain {f.chain} of {f.dev}; give 'prio'")
        same = [e for e in entries if e.filter.prio == prio]
        if same and same[0].filter.protocol != f.protocol:
            raise RuleSyntaxError(f"filter: prio {prio} in chain {f.chain} of {f.dev} "
                                  "already holds filters of another protocol")
        handle = f.handle
        used = {e.filter.handle for e in same}
        if handle is None:
            handle = max(used, default=0) + 1
            if handle > U32:
                handle = next(h for h in range(1, U32 + 1) if h not in used)
        elif handle in used:
            raise RuleSyntaxError(f"filter: handle {handle:#x} already exists at prio {prio} "
                                  f"in chain {f.chain} of {f.dev}")
        actions, indices, notes = self._bind(f.actions)
        f = dataclasses.replace(f, prio=prio, handle=handle, actions=actions)
        for a, i in zip(actions, indices):
            self._held[(a.tc_kind, i)][1] += 1
        entry = _Entry(f, next(self._seq), FilterStats(), indices, notes)
        entries = self._chains.setdefault(f.dev, {}).setdefault(f.chain, [])
        entries.append(entry)
        entries.sort(key=lambda e: (e.filter.prio, e.seq))
        return f

    def _bind(self, actions: tuple[Action, ...]) -> tuple[tuple[Action, ...], tuple[int, ...], list[str]]:
        """Each action with its index: the lowest free one of its kind, or,
        for an index given that an action of its kind has, that action.
        An assigned index stays out of the Filter (its line is as added)."""
        known = self._held
        out, indices, notes = [], [], []
        for a in actions:
            kind = a.tc_kind
            index = a.index
            if index is None:
                index = self._low.get(kind, 1)
                while (kind, index) in known:
                    index += 1
                self._low[kind] = index + 1
            elif (kind, index) in known and dataclasses.replace(known[(kind, index)][0], index=index) != a:
                old = known[(kind, index)][0]
                notes.append(f"action {kind} index {index} exists: the filter is bound to it and runs "
                             f"`{format_action(old)}`, not `{format_action(a)}` (as tc does)")
                a = dataclasses.replace(old, index=index)   # the line names the binding
            known.setdefault((kind, index), [a, 0])[0] = a
            out.append(a)
            indices.append(index)
        return tuple(out), tuple(indices), notes

    def indices(self, f: Filter) -> tuple[int, ...]:
        """The index of each of f's actions."""
        return self._entry(f).indices

    def notes(self, f: Filter) -> list[str]:
        """What adding f did besides adding it (an action bound by index)."""
        return list(self._entry(f).notes)

    def action_refs(self) -> dict[tuple[str, int], int]:
        """How many filters hold each action (kind, index): tc's ref and
        bind counts."""
        return {k: n for k, (_, n) in self._held.items()}

    def delete(self, dev: str, chain: int | None = None, prio: int | None = None,
               handle: int | None = None, protocol: int | None = None) -> list[Filter]:
        """Remove every filter of dev matching the given fields; returns
        what was removed (the offload manager evicts their flows)."""
        removed: list[Filter] = []
        chains = self._chains.get(dev, {})
        for c in list(chains):
            if chain is not None and c != chain:
                continue
            keep = []
            for e in chains[c]:
                f = e.filter
                if ((prio is None or f.prio == prio)
                        and (handle is None or f.handle == handle)
                        and (protocol is None or f.protocol == protocol)):
                    removed.append(f)
                    self._release(e)
                else:
                    keep.append(e)
            if keep:
                chains[c] = keep
            else:
                del chains[c]
        if not chains:
            self._chains.pop(dev, None)
        return removed

    def _release(self, e: _Entry) -> None:
        """A removed filter's hold on its actions; an action no filter holds
        any more is gone, and its index free again."""
        for a, i in zip(e.filter.actions, e.indices):
            key = (a.tc_kind, i)
            self._held[key][1] -= 1
            if not self._held[key][1]:
                del self._held[key]
                self._low[a.tc_kind] = min(self._low.get(a.tc_kind, 1), i)

    def replace_all(self, filters: list[Filter]) -> None:
        """Swap in a whole new set, or nothing if any filter is refused."""
        fresh = RuleSet(filters)
        self._chains, self._seq = fresh._chains, fresh._seq
        self._held, self._low = fresh._held, fresh._low

    # -- reading ---------------------------------------------------------
    def devices(self) -> list[str]:
        return sorted(self._chains)

    def chains(self, dev: str) -> list[int]:
        return sorted(self._chains.get(dev, {}))

    def chain(self, dev: str, chain_no: int) -> list[Filter]:
        """The filters of one chain in evaluation order; the index in this
        list is the "rule" of a resume point."""
        return [e.filter for e in self._chains.get(dev, {}).get(chain_no, [])]

    def filters(self, dev: str | None = None) -> list[Filter]:
        devs = [dev] if dev is not None else self.devices()
        return [e.filter for d in devs for c in self.chains(d)
                for e in self._chains[d][c]]

    def __len__(self) -> int:
        return len(self.filters())

    def _entry(self, f: Filter) -> _Entry:
        for e in self._chains.get(f.dev, {}).get(f.chain, []):
            if e.filter.prio == f.prio and e.filter.handle == f.handle:
                return e
        raise KeyError(f"no filter {f.key}")

    def stats(self, f: Filter) -> FilterStats:
        return self._entry(f).stats

    def record_hit(self, f: Filter, nbytes: int) -> None:
        st = self._entry(f).stats
        st.packets += 1
        st.bytes += nbytes

    def show(self, dev: str | None = None, chain: int | None = None,
             stats: bool = False, hw_stats: dict | None = None, aggregates: dict | None = None) -> list[str]:
        """The filters as `filter add` lines (the round trip of the CLI's
        `filter show`).  With stats, each entry gets its counters in the
        layout of `tc -s filter show` for a filter offloaded to a NIC: the
        total, then what software and what the hardware counted (hw_stats:
        Filter -> (packets, bytes)), then, where given, what its flows
        counted (aggregates: Filter -> (packets, bytes, flows, seconds
        since last used or None))."""
        hw_stats = hw_stats or {}
        aggregates = aggregates or {}
        out = []
        for f in self.filters(dev):
            if chain is not None and f.chain != chain:
                continue
            line = format_filter(f)
            if stats:
                sw = self._entry(f).stats
                hp, hb = hw_stats.get(f, (0, 0))
                line += (f"\n\tSent {sw.bytes + hb} bytes {sw.packets + hp} pkt"
                         f"\n\tSent software {sw.bytes} bytes {sw.packets} pkt"
                         f"\n\tSent hardware {hb} bytes {hp} pkt")
                if f in aggregates:
                    ap, ab, flows, ago = aggregates[f]
                    used = "never" if ago is None else f"{ago:.3f} s ago"
                    line += f"\n\tSent by its flows {ab} bytes {ap} pkt ({flows} flows, used {used})"
            out.append(line)
        return out
