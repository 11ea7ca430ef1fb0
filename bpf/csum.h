/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Checksum verification in the "NIC" (slide 22: "packet checksum (by
 * layer) ... used for -inv/+inv"): what nf_conntrack_checksum=1 makes
 * conntrack check before a lookup, at the first ct action a packet meets.
 *
 * Contract: csum_ok() returns 1 when every layer the hardware was asked to
 * verify (CTCTL_CAP_CSUM_IPV4, CTCTL_CAP_CSUM_L4) is right, 0 when one is
 * wrong.  As the kernel, it trusts what needs no verifying:
 *  - a packet the receiving stack already verified (CHECKSUM_UNNECESSARY)
 *    or that a receiver aggregated (GRO: gso_size set);
 *  - a TCP/UDP checksum a sender left to its NIC (CHECKSUM_PARTIAL, veth's
 *    default): its field holds exactly the pseudo-header sum.  The skb's
 *    flag is not visible here, so the field tells, as software's
 *    complete_partial_checksum (ctctl/kernel/csum.py) tells it: a corrupt
 *    packet whose field happens to hold that sum (1 in 65,536) passes;
 *  - a UDP checksum of 0 ("none"), over IPv6 too, as conntrack does.
 *
 * The L4 sum reads the segment in CTCTL_CSUM_CHUNK steps into the state's
 * buffer (ctx_load: an skb's paged data too), at most CTCTL_MAX_PUNT bytes.
 */
#ifndef CTCTL_CSUM_H
#define CTCTL_CSUM_H

#include "ctctl_abi.h"
#include "hook.h"
#include "key.h"

#define CTCTL_CSUM_STEPS (CTCTL_MAX_PUNT / CTCTL_CSUM_CHUNK + 1)

static __always_inline __u32 csum_fold16(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (s & 0xffff) + (s >> 16);
}

/* The IPv4 header (no options reach here: they punt) sums to 0xffff. */
static __always_inline int csum_ipv4_ok(ctctl_ctx *ctx, const struct ctctl_state *st)
{
	__u32 hdr[5];

	if (ctx_load(ctx, st->l3_off, hdr, sizeof(hdr)) < 0)
		return 0;
	return csum_fold16((__u32)bpf_csum_diff(0, 0, hdr, sizeof(hdr), 0)) == 0xffff;
}

/* The pseudo-header's sum, in the packet's byte order like the rest. */
static __always_inline __u64 csum_pseudo(const struct ctctl_state *st, __u32 l4_len)
{
	struct {
		__u32 addrs[8];
		__u32 len;
		__u8 zero[3];
		__u8 proto;
	} ph = {};

	if (st->l3 == 4) {
		__builtin_memcpy(ph.addrs, st->key.src, 4);
		__builtin_memcpy(&ph.addrs[1], st->key.dst, 4);
	} else {
		__builtin_memcpy(ph.addrs, st->key.src, 16);
		__builtin_memcpy(&ph.addrs[4], st->key.dst, 16);
	}
	/* The 32-bit length and the protocol sum as IPv4's 16-bit ones do. */
	ph.len = bpf_htonl(l4_len);
	ph.proto = st->key.ip_proto;
	return (__u32)bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
}

/*
 * The one's-complement sum of the transport segment [off, end) added to
 * `sum`; 0 and *out set, or -1 when it cannot be read.
 */
static __always_inline int csum_segment(ctctl_ctx *ctx, struct ctctl_state *st, __u32 off,
					__u32 end, __u64 sum, __u64 *out)
{
	__u32 i;

#pragma clang loop unroll(disable)
	for (i = 0; i < CTCTL_CSUM_STEPS; i++) {
		__u64 n, m;

		if (off >= end)
			break;
		/*
		 * The step's length goes through the map and is bounded after
		 * it: the verifier then does not trace it (a helper's size must
		 * be exact) back to `off`, which would make every step's state
		 * new to it and its work grow with each one.
		 */
		st->csum_left = end - off;
		n = *(volatile __u32 *)&st->csum_left;
		if (n > CTCTL_CSUM_CHUNK)
			n = CTCTL_CSUM_CHUNK;
		if (n == 0)
			return -1;
		/* 1..256 as arithmetic: 6.1's verifier learns no lower bound
		 * from the test above, and a helper's size must be at least 1. */
		n = ((n - 1) & (CTCTL_CSUM_CHUNK - 1)) + 1;
		asm volatile("" : "+r"(n));
		/* A short last step sums as if padded with zeros (RFC 1071). */
		st->csum_buf[(n >> 2) & (CTCTL_CSUM_CHUNK / 4 - 1)] = 0;
		if (ctx_load(ctx, off, st->csum_buf, n) < 0)
			return -1;
		m = (n + 3) & ~3ULL;
		if (m > CTCTL_CSUM_CHUNK)
			m = CTCTL_CSUM_CHUNK;
		asm volatile("" : "+r"(m));
		sum += (__u32)bpf_csum_diff(0, 0, st->csum_buf, m, 0);
		off += n;
	}
	*out = sum;
	return 0;
}

static __always_inline int csum_l4_ok(ctctl_ctx *ctx, struct ctctl_state *st)
{
	__u32 off = st->l4_off, l4_len = st->l3_len - (st->l4_off - st->l3_off);
	__u16 field;
	__u64 sum = 0;

	if (st->key.ip_proto != IPPROTO_TCP && st->key.ip_proto != IPPROTO_UDP &&
	    st->key.ip_proto != IPPROTO_ICMP && st->key.ip_proto != IPPROTO_ICMPV6)
		return 1;
	if (ctx_load(ctx, st->csum_off, &field, sizeof(field)) < 0)
		return 0;
	if (st->key.ip_proto == IPPROTO_UDP && field == 0)
		return 1;
	if (st->csum_pseudo) {
		sum = csum_pseudo(st, l4_len);
		/* CHECKSUM_PARTIAL: the field is the folded pseudo-header sum. */
		if (st->key.ip_proto != IPPROTO_ICMPV6 && field == csum_fold16(sum))
			return 1;
	}
	if (csum_segment(ctx, st, off, off + l4_len, sum, &sum) < 0)
		return 0;
	return csum_fold16(sum) == 0xffff;
}

#ifdef CTCTL_XDP
/*
 * At XDP (bpf/hook.h): complete a TCP/UDP checksum its sender left partial,
 * as the kernel's skb_checksum_help would before a device that cannot.
 * The field of such a packet holds the folded pseudo-header sum, so the
 * sum of the segment as it is, field included, is the pseudo-header's plus
 * the data's: the complete checksum is its complement.  A complete
 * checksum that happens to equal that sum (1 in 65,536) is recomputed
 * into itself; a corrupt one (as rare among those) would be made right,
 * the price of not having the skb's flag.  Runs before anything rewrites
 * the packet, whose incremental updates assume a complete checksum.
 *
 * The test runs on every TCP/UDP frame, so it is made of what the parser
 * already has: the pseudo-header summed as 32-bit words (as bpf_csum_diff
 * sums them, the field read in the same byte order) and the field read in
 * place; only a partial checksum costs the state and the segment's sum.
 * Returns 1 when it completed one, 0 when there was none, -1 on error.
 */
static __always_inline int csum_complete_partial(ctctl_ctx *ctx, const struct ctctl_pkt *p,
						 struct ctctl_state *st)
{
	__u32 l4_len = p->l3_len - (p->l4_off - p->l3_off);
	__u16 *fp = ctx_ptr(ctx, p->l4_off + (p->proto == IPPROTO_TCP ? 16 : 6), 2), field;
	__u64 sum;

	if (!fp)
		return -1;
	field = *fp;
	if (p->proto == IPPROTO_UDP && field == 0)
		return 0;
	sum = (__u64)p->src[0] + p->src[1] + p->src[2] + p->src[3] +
	      p->dst[0] + p->dst[1] + p->dst[2] + p->dst[3] +
	      bpf_htonl(l4_len) + ((__u32)p->proto << 24);
	if (field != csum_fold16(sum))
		return 0;
	state_load(st, p);
	if (csum_segment(ctx, st, st->l4_off, st->l4_off + l4_len, 0, &sum) < 0)
		return -1;
	field = ~csum_fold16(sum);
	if (p->proto == IPPROTO_UDP && field == 0)
		field = 0xffff;
	return ctx_store(ctx, st->csum_off, &field, sizeof(field)) < 0 ? -1 : 1;
}
#endif

static __always_inline int csum_ok(ctctl_ctx *ctx, struct ctctl_state *st, __u32 caps)
{
	if (ctx_csum_trusted(ctx))
		return 1;
	if ((caps & CTCTL_CAP_CSUM_IPV4) && st->l3 == 4 && !csum_ipv4_ok(ctx, st))
		return 0;
	if ((caps & CTCTL_CAP_CSUM_L4) && !csum_l4_ok(ctx, st))
		return 0;
	return 1;
}

#endif /* CTCTL_CSUM_H */
