/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The hook the "NIC" runs at: TC ingress (an skb, the default) or XDP
 * (-DCTCTL_XDP: veth's driver mode, a frame and no skb yet).  Everything
 * else in bpf/ is the same source for both; what differs between the two
 * is here, as one small inline function per thing the program asks of its
 * packet.
 *
 * What an XDP frame has not, and what the program does instead:
 *  - no checksum state: a TCP/UDP checksum a local sender left to its NIC
 *    (CHECKSUM_PARTIAL, veth's default) reaches XDP as the bare
 *    pseudo-header sum, and no receiver completes it after a redirect.
 *    The program completes it (bpf/csum.h csum_complete_partial(), counted
 *    csum_completed), before anything rewrites the packet; the helpers'
 *    incremental checksum updates are done by hand (ctx_csum_replace()),
 *    always into the field, as for an skb whose checksum is complete;
 *  - no GSO super-packets: veth takes segmentation offload (TSO and the
 *    rest of NETIF_F_GSO_SOFTWARE) from its peer while an XDP program is
 *    attached, so the sender's stack segments first, and the peer's MTU
 *    must fit a page;
 *  - no VLAN tag outside the frame: the loader turns the peer's VLAN
 *    offload off (ctctl/nic/xdp.py), so the tag is in the frame, where
 *    the parser reads it;
 *  - no skb->mark: the program never reads it at either hook;
 *  - a redirect only to a port of the box (the `ports` devmap): a mirred
 *    elsewhere punts with CTCTL_R_XDP_TARGET and software sends it.
 */
#ifndef CTCTL_HOOK_H
#define CTCTL_HOOK_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#ifdef CTCTL_XDP

typedef struct xdp_md ctctl_ctx;

#define CTCTL_OK XDP_PASS
#define CTCTL_SHOT XDP_DROP
#define CTCTL_REDIRECT XDP_REDIRECT

static __always_inline __u32 ctx_len(const ctctl_ctx *ctx)
{
	return ctx->data_end - ctx->data;
}

static __always_inline __u32 ctx_ifindex(const ctctl_ctx *ctx)
{
	return ctx->ingress_ifindex;
}

static __always_inline void *ctx_data(const ctctl_ctx *ctx)
{
	return (void *)(long)ctx->data;
}

static __always_inline void *ctx_data_end(const ctctl_ctx *ctx)
{
	return (void *)(long)ctx->data_end;
}

/*
 * `len` bytes of the frame at `off`, to read or write in place, or NULL
 * past its end: cheaper than the byte helpers for a few bytes.  The mask
 * is the verifier's bound on the offset (a frame fits a page).
 */
static __always_inline void *ctx_ptr(const ctctl_ctx *ctx, __u32 off, __u32 len)
{
	void *at = ctx_data(ctx) + (off & 0xfff);

	return at + len > ctx_data_end(ctx) ? NULL : at;
}

static __always_inline int ctx_load(ctctl_ctx *ctx, __u32 off, void *to, __u32 len)
{
	return bpf_xdp_load_bytes(ctx, off, to, len);
}

/* A few bytes of a length known at the call (NAT's addresses and ports)
 * are written in place; the rest through the helper. */
static __always_inline int ctx_store(ctctl_ctx *ctx, __u32 off, const void *from, __u32 len)
{
	if (__builtin_constant_p(len) && len <= 16) {
		void *at = ctx_ptr(ctx, off, len);

		if (!at)
			return -1;
		__builtin_memcpy(at, from, len);
		return 0;
	}
	return bpf_xdp_store_bytes(ctx, off, (void *)from, len);
}

/* Frames are never GSO and carry their VLAN tag inline (see above). */
static __always_inline int ctx_gso(const ctctl_ctx *ctx)
{
	return 0;
}

static __always_inline int ctx_vlan_offloaded(const ctctl_ctx *ctx)
{
	return 0;
}

/* No receiver trusts an XDP frame's checksum: always verify. */
static __always_inline int ctx_csum_trusted(ctctl_ctx *ctx)
{
	return 0;
}

/* Grow (delta > 0) or shrink the frame in front of its Ethernet header:
 * the caller writes the new front, headers included, at offset 0. */
static __always_inline int ctx_adjust_mac(ctctl_ctx *ctx, int delta)
{
	return bpf_xdp_adjust_head(ctx, -delta);
}

/* The frame is linear (the program does not take multi-buffer frames). */
static __always_inline void ctx_pull(ctctl_ctx *ctx, __u32 len)
{
}

/*
 * bpf_l3/l4_csum_replace's arithmetic on the field itself (RFC 1624):
 * flags' low bits are the size of `from` and `to` (2 or 4), or 0 when `to`
 * is already a difference (bpf_csum_diff's); BPF_F_MARK_MANGLED_0 keeps a
 * UDP "no checksum" 0 and writes a computed 0 as 0xffff.  Values are as
 * the packet holds them: one's-complement sums do not mind the order.
 */
static __always_inline int ctx_csum_replace(ctctl_ctx *ctx, __u32 off, __u32 from, __u32 to,
					    __u64 flags)
{
	/* In place: NAT updates three or four checksums. */
	__u16 *fp = ctx_ptr(ctx, off, 2), field;
	__u64 s;

	if (!fp)
		return -1;
	field = *fp;
	if ((flags & BPF_F_MARK_MANGLED_0) && field == 0)
		return 0;
	s = (__u16)~field;
	switch (flags & BPF_F_HDR_FIELD_MASK) {
	case 0:
		s += to;
		break;
	case 2:
		s += (__u16)~from + (to & 0xffff);
		break;
	default:
		s += (__u16)~from + (__u16)~(from >> 16) + (to & 0xffff) + (to >> 16);
		break;
	}
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	field = ~s;
	if ((flags & BPF_F_MARK_MANGLED_0) && field == 0)
		field = 0xffff;
	*fp = field;
	return 0;
}

static __always_inline int ctx_l3_csum_replace(ctctl_ctx *ctx, __u32 off, __u32 from, __u32 to,
					       __u64 flags)
{
	return ctx_csum_replace(ctx, off, from, to, flags);
}

static __always_inline int ctx_l4_csum_replace(ctctl_ctx *ctx, __u32 off, __u32 from, __u32 to,
					       __u64 flags)
{
	return ctx_csum_replace(ctx, off, from, to, flags);
}

#else /* TC ingress */

typedef struct __sk_buff ctctl_ctx;

#define CTCTL_OK TC_ACT_OK
#define CTCTL_SHOT TC_ACT_SHOT
#define CTCTL_REDIRECT TC_ACT_REDIRECT

static __always_inline __u32 ctx_len(const ctctl_ctx *ctx)
{
	return ctx->len;
}

static __always_inline __u32 ctx_ifindex(const ctctl_ctx *ctx)
{
	return ctx->ifindex;
}

static __always_inline int ctx_load(ctctl_ctx *ctx, __u32 off, void *to, __u32 len)
{
	return bpf_skb_load_bytes(ctx, off, to, len);
}

static __always_inline int ctx_store(ctctl_ctx *ctx, __u32 off, const void *from, __u32 len)
{
	return bpf_skb_store_bytes(ctx, off, (void *)from, len, 0);
}

static __always_inline int ctx_gso(const ctctl_ctx *ctx)
{
	return ctx->gso_size != 0;
}

static __always_inline int ctx_vlan_offloaded(const ctctl_ctx *ctx)
{
	return ctx->vlan_present;
}

/* The stack already verified it (CHECKSUM_UNNECESSARY), or a receiver
 * aggregated it (GRO: gso_size set). */
static __always_inline int ctx_csum_trusted(ctctl_ctx *ctx)
{
	return ctx->gso_size || bpf_csum_level(ctx, BPF_CSUM_LEVEL_QUERY) >= 0;
}

static __always_inline int ctx_adjust_mac(ctctl_ctx *ctx, int delta)
{
	return bpf_skb_adjust_room(ctx, delta, BPF_ADJ_ROOM_MAC, 0);
}

static __always_inline void *ctx_data(const ctctl_ctx *ctx)
{
	return (void *)(long)ctx->data;
}

static __always_inline void *ctx_data_end(const ctctl_ctx *ctx)
{
	return (void *)(long)ctx->data_end;
}

/* Non-linear skbs (veth with GRO, for one) may hold headers in frags. */
static __always_inline void ctx_pull(ctctl_ctx *ctx, __u32 len)
{
	if (ctx->data_end - ctx->data < len)
		bpf_skb_pull_data(ctx, len);
}

static __always_inline int ctx_l3_csum_replace(ctctl_ctx *ctx, __u32 off, __u32 from, __u32 to,
					       __u64 flags)
{
	return bpf_l3_csum_replace(ctx, off, from, to, flags);
}

static __always_inline int ctx_l4_csum_replace(ctctl_ctx *ctx, __u32 off, __u32 from, __u32 to,
					       __u64 flags)
{
	return bpf_l4_csum_replace(ctx, off, from, to, flags);
}

#endif /* CTCTL_XDP */

#endif /* CTCTL_HOOK_H */
