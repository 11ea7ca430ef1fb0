/* SPDX-License-Identifier: GPL-2.0 */
/*
 * NAT of an offloaded connection, as a ct action's hit applies it.
 *
 * Contract: nat_apply() rewrites the packet to the entry's translation and
 * the interpreter's key with it, so that later matches and ct lookups see
 * the translated packet, and adds CTCTL_DONE_SNAT/DNAT to st->done for
 * the sides it rewrote.  It returns 0, or a negative errno when a helper failed (the packet may then
 * be half rewritten: the caller drops it rather than punt it).
 *
 * - NAT_SRC: source address, and for TCP/UDP the source port, become
 *   nat_src/nat_sport; NAT_DST likewise for the destination.
 * - ICMP(v6) echo: the identifier (the tuple's sport) becomes nat_sport
 *   whichever side is translated, as nf_nat's ICMP manip does; the type and
 *   code are never rewritten.
 * - Checksums are fixed incrementally, never recomputed: the IPv4 header
 *   checksum; TCP, UDP and ICMPv6 through the pseudo-header; ICMP (v4) only
 *   for the identifier, it has no pseudo-header.  A UDP checksum of 0 over
 *   IPv4 means "none" and stays 0 (BPF_F_MARK_MANGLED_0, which also writes
 *   0xffff for a computed 0).  Where the checksum is, and how it is fixed,
 *   state_load() found once (bpf/key.h).
 *
 * Everything the verifier would see as a constant that differs between
 * paths (which side, which family) is kept in the scratch state, not in
 * registers, so the paths through here join again for it.  Every helper is
 * in Linux 6.1 (Debian's), the oldest kernel we run on.
 */
#ifndef CTCTL_NAT_H
#define CTCTL_NAT_H

#include <uapi/linux/bpf.h>

#include "ctctl_abi.h"
#include "key.h"

/* Rewrite one address: `cur` is the key's copy, updated to `to`. */
static __always_inline int nat_addr(ctctl_ctx *ctx, const struct ctctl_state *st,
				    __u8 *cur, const __u8 *to, __u32 v4_off, __u32 v6_off)
{
	__u64 l4flags = BPF_F_PSEUDO_HDR | st->csum_flags;
	int err = 0;

	if (st->l3 == 4) {
		__u32 from = *(__u32 *)cur, new = *(const __u32 *)to;

		err = ctx_l3_csum_replace(ctx, st->l3_off + 10, from, new, 4);
		if (!err && st->csum_pseudo)
			err = ctx_l4_csum_replace(ctx, st->csum_off, from, new, l4flags | 4);
		if (!err)
			err = ctx_store(ctx, st->l3_off + v4_off, &new, 4);
		*(__u32 *)cur = new;
		return err;
	}
	/* IPv6 has no header checksum; its addresses are in every pseudo-header. */
	err = ctx_l4_csum_replace(ctx, st->csum_off, 0,
				  bpf_csum_diff((__be32 *)cur, 16, (__be32 *)to, 16, 0),
				  l4flags);
	if (!err)
		err = ctx_store(ctx, st->l3_off + v6_off, (void *)to, 16);
	__builtin_memcpy(cur, to, 16);
	return err;
}

/* Rewrite the 16-bit transport field at l4_off + off (a port, or the echo id). */
static __always_inline int nat_port(ctctl_ctx *ctx, const struct ctctl_state *st,
				    __be16 *cur, const __be16 *to, __u32 off)
{
	int err = ctx_l4_csum_replace(ctx, st->csum_off, *cur, *to, st->csum_flags | 2);

	if (!err)
		err = ctx_store(ctx, st->l4_off + off, (void *)to, 2);
	*cur = *to;
	return err;
}

static __always_inline int nat_apply(ctctl_ctx *ctx, struct ctctl_state *st,
				     const struct ctctl_flow *f)
{
	int err = 0;

	if (f->nat & CTCTL_NAT_SRC) {
		err = nat_addr(ctx, st, st->key.src, f->nat_src, 12, 8);
		if (!err && st->l4_kind == CTCTL_L4_PORTS)
			err = nat_port(ctx, st, &st->sport, &f->nat_sport, 0);
		st->done |= CTCTL_DONE_SNAT;
	}
	if (err)
		return err;
	if (f->nat & CTCTL_NAT_DST) {
		err = nat_addr(ctx, st, st->key.dst, f->nat_dst, 16, 24);
		if (!err && st->l4_kind == CTCTL_L4_PORTS)
			err = nat_port(ctx, st, &st->dport, &f->nat_dport, 2);
		st->done |= CTCTL_DONE_DNAT;
	}
	if (!err && st->l4_kind == CTCTL_L4_ECHO && st->sport != f->nat_sport)
		err = nat_port(ctx, st, &st->sport, &f->nat_sport, 4);
	return err;
}

#endif /* CTCTL_NAT_H */
