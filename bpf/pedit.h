/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Header rewrites in the "NIC": act_pedit's keys and act_csum's fix-ups,
 * as a routing rule set uses them (MAC rewrite, TTL decrement, address
 * rewrite), run where the rule's actions name them.
 *
 * Contract: pedit_apply() writes the rule's keys [first, first + n) into
 * the packet as act_pedit does (ctctl/kernel/rewrite.py is the reference,
 * byte for byte): a key outside the packet ends the action there, the keys
 * before it staying written, and the action's verb still applies (counted
 * in CTCTL_C_PEDIT_SHORT, the kernel's overlimit).  It fixes no checksum,
 * as act_pedit fixes none, but keeps what each word's change does to the
 * checksums that cover it (st->pend_*), and reads the addresses and ports
 * back into the key, so that later matches, ct lookups and NAT see the
 * rewritten packet.  csum_apply() folds the pending changes into the
 * checksums the action names, for the packet's protocol.
 *
 * act_csum recomputes a checksum from the bytes; the NIC updates it by the
 * difference (RFC 1624), which gives the same bytes for a packet whose
 * checksum was right, and keeps a checksum that was wrong wrong (software
 * would repair it: docs/offload.md).  Incremental also suits a packet whose
 * sender left its transport checksum to the NIC (CHECKSUM_PARTIAL, the
 * field holding the pseudo-header's sum): the pseudo-header's changes are
 * applied with BPF_F_PSEUDO_HDR and the header's are not, as the kernel's
 * own helpers treat such a packet.
 *
 * Which checksum a word belongs to is a matter of where it lies in this
 * packet, not which header the key was written for (act_pedit writes
 * `ip ttl` keys into an IPv6 header too): the IPv4 header, its addresses
 * (also in the pseudo-header), IPv6's addresses, or the transport segment.
 * Keys come 4-byte aligned from the network header on, so no word
 * straddles two of these.
 */
#ifndef CTCTL_PEDIT_H
#define CTCTL_PEDIT_H

#include <uapi/linux/bpf.h>

#include "ctctl_abi.h"
#include "key.h"

/* Read the rewritten addresses and ports back into the key. */
static __always_inline int pedit_reload(ctctl_ctx *ctx, struct ctctl_state *st)
{
	int err;

	if (st->l3 == 4) {
		err = ctx_load(ctx, st->l3_off + 12, st->key.src, 4);
		if (!err)
			err = ctx_load(ctx, st->l3_off + 16, st->key.dst, 4);
	} else {
		err = ctx_load(ctx, st->l3_off + 8, st->key.src, 16);
		if (!err)
			err = ctx_load(ctx, st->l3_off + 24, st->key.dst, 16);
	}
	if (!err && st->l4_kind == CTCTL_L4_PORTS)
		err = ctx_load(ctx, st->l4_off, &st->sport, 4);
	else if (!err && st->l4_kind == CTCTL_L4_ECHO)
		err = ctx_load(ctx, st->l4_off + 4, &st->sport, 2);
	return err;
}

/*
 * Where the keys count from and which bytes each checksum covers, for this
 * packet, into the scratch state: the loop below reads them back as values
 * the verifier does not know, so its body is one path whatever the family.
 */
static __always_inline void pedit_layout(struct ctctl_state *st)
{
	st->hdr_base[CTCTL_PH_ETH] = 0;
	st->hdr_base[CTCTL_PH_NETWORK] = st->l3_off;
	st->hdr_base[CTCTL_PH_TRANSPORT] = st->l4_off;
	st->hdr_base[3] = 0;
	if (st->l3 == 4) {
		st->iph_lo = st->l3_off;
		st->iph_len = 20;
		st->pseudo_lo = st->l3_off + 12;
		st->pseudo_len = 8;
	} else {
		st->iph_lo = 0;
		st->iph_len = 0;
		st->pseudo_lo = st->l3_off + 8;
		st->pseudo_len = 32;
	}
	st->seg_lo = st->l4_off;
	st->seg_len = st->l3_len - (st->l4_off - st->l3_off);
}

/* 1 when lo <= at < lo + len, without a branch (all below 2^32). */
static __always_inline __u64 within(__u64 at, __u64 lo, __u64 len)
{
	__u64 t = at - lo;

	return ((t - len) >> 63) & ~(t >> 63) & 1;
}

/*
 * The key's index goes through the scratch state and is bounded after it,
 * as the matching rule's does (bpf/rules.h), and the body branches only to
 * leave: a word's change is one 32-bit sum added, masked, to each checksum
 * it falls under (64-bit sums, folded by csum_apply()).  What it costs the
 * verifier, which goes through it in each of the interpreter's 36 (hop,
 * action) places: 181,345 instructions on 6.18 without it
 * (-DCTCTL_NO_REWRITE), 265,426 with it (6.1: 260,504), 192,115 with the
 * key loop compiled out.  A body with a branch per header type and
 * checksum was 268,802 on 6.18 and 518,763 on 6.1; all eight slots every
 * time without a branch (a slot of another action masked into a no-op)
 * 483,445 on 6.18.  docs/offload.md "The verifier".
 */
static __always_inline int pedit_apply(ctctl_ctx *ctx, struct ctctl_state *st,
				       const struct ctctl_rule *r, __u32 arg)
{
	__u32 first = arg & 0xff, n = (arg >> 8) & 0xff, k;

	pedit_layout(st);
#pragma clang loop unroll(disable)
	for (k = 0; k < CTCTL_MAX_PEDIT_KEYS; k++) {
		const struct ctctl_pedit_key *key;
		__u32 old, new, v, sel;
		__u64 at, d;
		__u32 i;

		if (k >= n)
			break;
		st->pedit_i = first + k;
		i = *(volatile __u32 *)&st->pedit_i;
		if (i >= CTCTL_MAX_PEDIT_KEYS)
			break;
		key = &r->pedit[i];
		at = st->hdr_base[key->htype & 3] + key->offset;
		if (at + 4 > ctx_len(ctx) || ctx_load(ctx, at, &old, 4) < 0) {
			count(CTCTL_C_PEDIT_SHORT, 1);
			break;
		}
		/* SET: val; ADD: the word plus val (the kernel's add, in host order). */
		sel = 0 - (__u32)(key->cmd & 1);
		v = key->val + (old & sel);
		new = (old & key->mask) ^ (v & ~key->mask);
		if (ctx_store(ctx, at, &new, 4) < 0)
			return -1;
		d = (__u32)bpf_csum_diff(&old, 4, &new, 4, 0);
		st->pend_iph += d & (0 - within(at, st->iph_lo, st->iph_len));
		st->pend_pseudo += d & (0 - within(at, st->pseudo_lo, st->pseudo_len));
		st->pend_l4 += d & (0 - within(at, st->seg_lo, st->seg_len));
	}
	st->done |= CTCTL_DONE_PEDIT;
	count(CTCTL_C_PEDIT, 1);
	return pedit_reload(ctx, st);
}

/* A 64-bit sum of 32-bit partial sums, as the 32-bit one the helpers take. */
static __always_inline __u32 fold32(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	return (s & 0xffffffff) + (s >> 32);
}

/* act_csum for the targets in `targets` (enum ctctl_csum_target): the
 * transport's checksum if its protocol is named, the IPv4 header's if
 * CTCTL_CSUMT_IPH is. */
static __always_inline int csum_apply(ctctl_ctx *ctx, struct ctctl_state *st, __u32 targets)
{
	__u32 want;
	int err = 0;

	switch (st->key.ip_proto) {
	case IPPROTO_TCP:
		want = CTCTL_CSUMT_TCP;
		break;
	case IPPROTO_UDP:
		want = CTCTL_CSUMT_UDP;
		break;
	default:	/* ICMP, ICMPv6: nothing else gets this far */
		want = CTCTL_CSUMT_ICMP;
		break;
	}
	if (targets & want) {
		if (st->pend_pseudo && st->csum_pseudo)
			err = ctx_l4_csum_replace(ctx, st->csum_off, 0, fold32(st->pend_pseudo),
						  BPF_F_PSEUDO_HDR | st->csum_flags);
		if (!err && st->pend_l4)
			err = ctx_l4_csum_replace(ctx, st->csum_off, 0, fold32(st->pend_l4), st->csum_flags);
		st->pend_pseudo = 0;
		st->pend_l4 = 0;
	}
	if (!err && (targets & CTCTL_CSUMT_IPH) && st->l3 == 4 && st->pend_iph) {
		err = ctx_l3_csum_replace(ctx, st->l3_off + 10, 0, fold32(st->pend_iph), 0);
		st->pend_iph = 0;
	}
	count(CTCTL_C_CSUM, 1);
	return err;
}

#endif /* CTCTL_PEDIT_H */
