/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The "hardware" rule interpreter: the offloaded tc chains of the ingress
 * port, run on a parsed packet.
 *
 * Contract: interpret() returns the TC verdict of a packet it finished
 * (CTCTL_REDIRECT, CTCTL_SHOT, CTCTL_OK: bpf/hook.h's, with its counter moved), or
 * CTCTL_PUNT with st->reason and the resume point (st->chain, st->rule,
 * st->action) set, the ct metadata and st->done as they are at that point,
 * or CTCTL_ENCAP: a mirred to a tunnel device, which the caller
 * encapsulates once, outside the loops (bpf/tunnel.h), the resume point
 * at that mirred.  Chains are those of st->in_ifindex.
 * The semantics are ctctl/kernel/pipeline.py's, the software reference; where the
 * hardware stops short of it, it punts and software continues from the
 * resume point (docs/offload.md lists the cases).
 *
 * Verifier: three bounded loops, chain hops (9) > rules of a chain (64) >
 * actions of a rule (4), and a pedit action's keys (8) inside the last.  The matching rule's index goes through the
 * scratch map and is read back as a number the verifier does not know, so
 * the actions are verified once per hop, not once per rule that may match.
 */
#ifndef CTCTL_RULES_H
#define CTCTL_RULES_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "ctctl_abi.h"
#include "key.h"
#include "maps.h"
#include "nat.h"
#include "pedit.h"
#include "tunnel.h"
#include "window.h"

#define CTCTL_ENCAP (-2)	/* mirred to a tunnel device: st->encap_dev, resume point at it */
#define CTCTL_CONTINUE 0
#define CTCTL_NO_RULE 0xffff	/* st->rule while no rule matched */

#define CTCTL_TCP_FIN 0x01
#define CTCTL_TCP_SYN 0x02
#define CTCTL_TCP_RST 0x04

static __always_inline int stop(struct ctctl_state *st, __u16 reason, __u32 rule, __u32 action)
{
	st->reason = reason;
	st->rule = rule;
	st->action = action;
	return CTCTL_PUNT;
}

static __always_inline void count_rule(const struct ctctl_rule *r, __u32 len)
{
	struct ctctl_rule_stats *s = rule_stats_lookup(r->id);

	if (s) {
		s->packets++;	/* per-CPU slot */
		s->bytes += len;
	}
}

/*
 * A packet conntrack would call invalid (bpf/window.h, bpf/csum.h): +trk+inv
 * in the action's zone, no connection (mark and label 0), so that the
 * rules after it decide as software's would, +inv rules and the no-match
 * drop included; or, by the caps, software's to judge (CT_INVALID).
 */
static __always_inline int ct_invalid(struct ctctl_state *st, const struct ctctl_action *act,
				      __u32 caps, __u32 rule, __u32 a)
{
	if (caps & CTCTL_CAP_INVALID_PUNT)
		return stop(st, CTCTL_R_CT_INVALID, rule, a);
	st->key.ct_state = CTCTL_CS_TRK | CTCTL_CS_INV;
	st->key.ct_zone = act->zone;
	st->key.ct_mark = 0;
	__builtin_memset(st->key.ct_label, 0, 16);
	st->ct_flow.nat = 0;	/* no connection: a later ct here has no NAT to apply */
	st->ct_flow.ct_state = 0;
	st->done |= CTCTL_DONE_CT;
	return CTCTL_CONTINUE;
}

/*
 * The ct action: answered from the offload table, from act_ct's per-packet
 * cache, or a punt.  Resuming at this very action lets software run it
 * through conntrack in full.
 *
 * The cache (act_ct's tcf_ct_skb_nfct_cached, ctctl/kernel/pipeline.py _ct_cached):
 * a packet that already had a hit in this action's zone, and was not
 * cleared since (ct_state +trk), is not looked up again.  Its translated
 * tuple is in no entry, and the entry must not count it twice.  The action
 * keeps the metadata as it is; with nat it applies the saved entry's NAT
 * if no earlier action of the packet did, and adds the entry's +snat/+dnat
 * (the connection's manips for this direction, as software sets them).
 *
 * `ct force` on a reply-direction packet: software kills the connection
 * and starts a new one in the other direction.  That is conntrack's, so
 * the program punts (ct_miss) at this action, hit or cached.
 */
static __always_inline int do_ct(ctctl_ctx *ctx, struct ctctl_state *st,
				 const struct ctctl_action *act, __u32 rule, __u32 a)
{
	struct ctctl_flow *f;
	__u32 caps;

	if ((st->done & CTCTL_DONE_CT) && (st->key.ct_state & CTCTL_CS_TRK) &&
	    st->key.ct_zone == act->zone) {
		if ((act->flags & CTCTL_CTF_FORCE) && (st->key.ct_state & CTCTL_CS_RPL))
			return stop(st, CTCTL_R_CT_MISS, rule, a);
		if (!(act->flags & CTCTL_CTF_NAT) || !st->ct_flow.nat)
			return CTCTL_CONTINUE;
		/* The entry's own +snat/+dnat: the connection's, as software's
		 * cache reports them (nat_ct_state in ctctl/kernel/conntrack/nat.py). */
		st->key.ct_state |= st->ct_flow.ct_state & (CTCTL_CS_SNAT | CTCTL_CS_DNAT);
		if (st->ct_nat_done)
			return CTCTL_CONTINUE;
		goto nat;
	}

	/* Checksums first, as conntrack's error check comes before its
	 * lookup (verified on entry: bpf/ctctl.c). */
	caps = hw_caps();
	if (st->csum_bad) {
		count(CTCTL_C_CSUM_INVALID, 1);
		return ct_invalid(st, act, caps, rule, a);
	}
	/* No tuple the table can hold (an ICMP error, say): software's. */
	if (state_tuple(st, act->zone) < 0)
		return stop(st, CTCTL_R_CT_MISS, rule, a);
	f = flow_lookup(&st->tuple);
	st->ct_lookups++;
	if (!f)
		return stop(st, CTCTL_R_CT_MISS, rule, a);
	/* Establishment and teardown are conntrack's, so software's. */
	if (st->key.ip_proto == IPPROTO_TCP &&
	    (st->tcp_flags & (CTCTL_TCP_SYN | CTCTL_TCP_FIN | CTCTL_TCP_RST)))
		return stop(st, CTCTL_R_CT_FLAGS, rule, a);
	if ((act->flags & CTCTL_CTF_FORCE) && f->dir == 1)
		return stop(st, CTCTL_R_CT_MISS, rule, a);
	if (st->key.ip_proto == IPPROTO_TCP && (caps & CTCTL_CAP_TCP_WINDOW)) {
		switch (tcp_window(st, f)) {
		case CTCTL_WIN_INVALID:
			count(CTCTL_C_WINDOW_INVALID, 1);
			return ct_invalid(st, act, caps, rule, a);
		case CTCTL_WIN_PUNT:
			return stop(st, CTCTL_R_CT_WINDOW, rule, a);
		case CTCTL_WIN_IGNORE:
			/* Through with the connection's metadata, but neither
			 * counted nor refreshed: the kernel's NF_ACCEPT before
			 * nf_ct_refresh_acct. */
			count(CTCTL_C_WINDOW_IGNORED, 1);
			caps &= ~(CTCTL_CAP_FLOW_COUNTERS | CTCTL_CAP_HW_AGING);
			break;
		}
	}

	count(CTCTL_C_CT_HIT, 1);
	st->ct_hit = 1;
	if (caps & CTCTL_CAP_FLOW_COUNTERS) {
		__sync_fetch_and_add(&f->packets, 1);
		/* IP bytes, as nf_conntrack accounts them: the counters fold into
		 * the connection's, which software counts the same way. */
		__sync_fetch_and_add(&f->bytes, st->l3_len);
	}
	/* A NIC that ages its own entries keeps their last use, counters
	 * or not: to the tick (bpf/ctctl.c last_use()). */
	if (caps & (CTCTL_CAP_FLOW_COUNTERS | CTCTL_CAP_HW_AGING))
		f->last_used_ns = last_use();
	/* The cache: what a later ct of this zone needs (not the counters),
	 * and what bpf/ctctl.c record_flow() compares the entry with. */
	__builtin_memcpy(&st->ct_flow.conn_id, &f->conn_id,
			 sizeof(*f) - __builtin_offsetof(struct ctctl_flow, conn_id));
	st->ct_nat_done = 0;

	/*
	 * The entry's +snat/+dnat are what its NAT sets, as the driver
	 * computed them the way software reports them; a ct action without
	 * nat translates nothing and sets neither, as act_ct.
	 */
	if ((act->flags & CTCTL_CTF_NAT) && f->nat)
		st->key.ct_state = f->ct_state;
	else
		st->key.ct_state = f->ct_state & ~(CTCTL_CS_SNAT | CTCTL_CS_DNAT);
	st->key.ct_zone = act->zone;
	st->key.ct_mark = f->mark;
	__builtin_memcpy(st->key.ct_label, f->label, 16);
	st->done |= CTCTL_DONE_CT;
	if (!(act->flags & CTCTL_CTF_NAT) || !f->nat)
		return CTCTL_CONTINUE;
nat:
	/* One place for the rewrite, from the saved copy: verified once. */
	if (nat_apply(ctx, st, &st->ct_flow) < 0) {
		count(CTCTL_C_DROP, 1);
		return CTCTL_SHOT;
	}
	count(CTCTL_C_NAT, 1);
	st->ct_nat_done = 1;
	return CTCTL_CONTINUE;
}

static __always_inline int interpret(ctctl_ctx *ctx, struct ctctl_state *st)
{
	__u32 hop;

	/* At most CTCTL_MAX_HOPS gotos: CTCTL_MAX_HOPS + 1 chains. */
#pragma clang loop unroll(disable)
	for (hop = 0; hop <= CTCTL_MAX_HOPS; hop++) {
		const struct ctctl_chain *ch;
		const struct ctctl_rule *r;
		__u32 n, i, a;

		st->ck.ifindex = st->in_ifindex;
		st->ck.chain = st->chain;
		ch = chain_lookup(&st->ck);
		if (!ch) {
			/* No chain 0: the port offloads nothing. */
			if (hop == 0)
				return stop(st, CTCTL_R_NO_OFFLOAD, 0, CTCTL_RESUME_MATCH);
			/* A goto to a chain the hardware was not given. */
			return stop(st, CTCTL_R_NO_MATCH, 0, CTCTL_RESUME_MATCH);
		}
		/*
		 * n is never clamped to 64: a clamp is a branch the verifier
		 * follows twice (n = 64, n < 64) through all that comes after.
		 * The volatile read in the loop keeps the compiler from making
		 * one of its own out of the loop's trip count.
		 */
		n = ch->n_rules;
		st->rule = CTCTL_NO_RULE;
#pragma clang loop unroll(disable)
		for (i = 0; i < CTCTL_MAX_RULES; i++) {
			if (i >= *(volatile const __u32 *)&ch->n_rules)
				break;
			if (rule_matches(&ch->rules[i], st)) {
				st->rule = i;
				break;
			}
		}
		/* Read the index back from the map: see the top of this file. */
		asm volatile("" ::: "memory");
		i = st->rule;
		if (i >= CTCTL_MAX_RULES)
			return stop(st, CTCTL_R_NO_MATCH,
				    n < CTCTL_MAX_RULES ? n : CTCTL_MAX_RULES, CTCTL_RESUME_MATCH);
		r = &ch->rules[i];
		count_rule(r, ctx_len(ctx));
#ifndef CTCTL_NO_PATH
		st->path[hop] = r->id;	/* hop <= CTCTL_MAX_HOPS < CTCTL_PATH_LEN */
#endif

#pragma clang loop unroll(disable)
		for (a = 0; a < CTCTL_MAX_ACTIONS; a++) {
			const struct ctctl_action *act = &r->actions[a];
			int ret;

			switch (act->kind) {
			case CTCTL_A_NONE:
				/* Off the end of the actions: tc's PIPE, OK at ingress. */
				count(CTCTL_C_PASS, 1);
				st->fp_verdict = CTCTL_FP_PASS;
				return CTCTL_OK;
			case CTCTL_A_CT:
				ret = do_ct(ctx, st, act, i, a);
				if (ret != CTCTL_CONTINUE)
					return ret;
				continue;
			case CTCTL_A_CT_CLEAR:
				st->key.ct_state = 0;
				st->key.ct_zone = 0;
				st->key.ct_mark = 0;
				__builtin_memset(st->key.ct_label, 0, 16);
				continue;
			case CTCTL_A_GOTO:
				if (st->hops >= CTCTL_MAX_HOPS) {
					count(CTCTL_C_GOTO_LOOP, 1);
					return CTCTL_SHOT;
				}
				st->hops++;
				st->chain = act->arg;
				goto next_chain;
			case CTCTL_A_MIRRED:
#ifndef CTCTL_NO_TUNNEL
				if (act->arg >= CTCTL_TUNNEL_DEV) {
					st->encap_dev = act->arg;
					st->rule = i;
					st->action = a;
					return CTCTL_ENCAP;
				}
#endif
				ret = port_redirect(act->arg);
				if (ret != CTCTL_REDIRECT)
					return stop(st, CTCTL_R_XDP_TARGET, i, a);
				count(CTCTL_C_REDIRECT, 1);
				st->fp_verdict = CTCTL_FP_REDIRECT;
				st->fp_arg = act->arg;
				return ret;
			case CTCTL_A_DROP:
				count(CTCTL_C_DROP, 1);
				st->fp_verdict = CTCTL_FP_DROP;
				return CTCTL_SHOT;
			case CTCTL_A_PASS:
				count(CTCTL_C_PASS, 1);
				st->fp_verdict = CTCTL_FP_PASS;
				return CTCTL_OK;
#ifndef CTCTL_NO_REWRITE	/* built without only to measure what they cost */
			case CTCTL_A_PEDIT:
				if (pedit_apply(ctx, st, r, act->arg) < 0) {
					count(CTCTL_C_DROP, 1);
					return CTCTL_SHOT;
				}
				continue;
			case CTCTL_A_CSUM:
				if (csum_apply(ctx, st, act->arg) < 0) {
					count(CTCTL_C_DROP, 1);
					return CTCTL_SHOT;
				}
				continue;
#endif
#ifndef CTCTL_NO_TUNNEL
			case CTCTL_A_TUNNEL_UNSET:
				st->tun.flags = 0;
				st->key.tun_id = 0;
				continue;
			case CTCTL_A_TUNNEL_SET:
				if (tunnel_set(st, act->arg) < 0)
					return stop(st, CTCTL_R_TRAP, i, a);
				continue;
#endif
			case CTCTL_A_TRAP:
				/* REMATCH: software decides the match (a skip_hw part). */
				return stop(st, CTCTL_R_TRAP, i,
					    act->arg == CTCTL_TRAP_REMATCH ? CTCTL_RESUME_MATCH : a);
			default:
				/* An action this hardware does not know: software's. */
				return stop(st, CTCTL_R_TRAP, i, a);
			}
		}
		count(CTCTL_C_PASS, 1);
		st->fp_verdict = CTCTL_FP_PASS;
		return CTCTL_OK;
next_chain:
		;
	}
	/* Not reached: the hop check above drops first. */
	count(CTCTL_C_GOTO_LOOP, 1);
	return CTCTL_SHOT;
}

#endif /* CTCTL_RULES_H */
