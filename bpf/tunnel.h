/* SPDX-License-Identifier: GPL-2.0 */
/*
 * VXLAN in the "NIC": the tunnel devices of the box (ctctl/kernel/tunnel.py
 * is the reference, docs/tunnels.md the model).
 *
 * Contract:
 * - tunnel_decap() runs once per packet, before the rules: a frame on a
 *   tunnel's underlay port that is VXLAN for that tunnel (IPv4, no options,
 *   UDP to its local address and port, the VXLAN I flag) loses its outer
 *   headers (bpf_skb_adjust_room) and is classified on the tunnel
 *   device's chains with its metadata, as the kernel's vxlan device hands
 *   it to tc; the sender's MAC is learned for its outer address.  A frame
 *   that is not VXLAN for the tunnel is the port's own.  One that is, but
 *   that the program leaves to software whole, punts CTCTL_R_TUNNEL
 *   before anything is done to it.
 * - tunnel_set() is a tunnel_key set (the metadata from its `encaps`
 *   slot); unset is bpf/rules.h's one line.
 * - tunnel_encap() runs once, after the rules sent the packet to a tunnel
 *   device: the outer headers software's encap() builds, byte for byte,
 *   then a redirect to the underlay port; or CTCTL_R_ENCAP at that mirred
 *   when the hardware cannot (see the reason), for software to run it.
 *
 * Nothing here runs inside the interpreter's loops but tunnel_set(): the
 * two adjust_room calls and the header building are verified once.
 */
#ifndef CTCTL_TUNNEL_H
#define CTCTL_TUNNEL_H

#include <uapi/linux/bpf.h>

#include "ctctl_abi.h"
#include "key.h"
#include "maps.h"

#define CTCTL_VXLAN_FLAG_I 0x08
#define CTCTL_VXLAN_PORT_LO 0xc000	/* outer UDP source ports: 49152-65535 */
/* Outer Ethernet, IPv4, UDP and VXLAN headers: what decapsulation removes. */
#define CTCTL_VXLAN_HLEN (14 + 20 + 8 + 8)
/* The outer headers and the inner Ethernet header, as one buffer. */
#define CTCTL_VXLAN_BUF (CTCTL_VXLAN_HLEN + 14)

/*
 * The headers are read and built in the scratch state's checksum buffer
 * (no room on the stack next to the parsed packet): the decapsulation is
 * done before the checksum verification uses it, the encapsulation after.
 * At 2 + their offsets the IP header's 16-bit words are aligned.
 */
static __always_inline __u8 *tunnel_buf(struct ctctl_state *st)
{
	return (__u8 *)st->csum_buf;
}

#define CTCTL_DECAP_NONE 0	/* not VXLAN for a tunnel: the port's own frame */
#define CTCTL_DECAP_DONE 1
#define CTCTL_DECAP_FAILED (-1)	/* the packet is half rewritten: dropped (counted) */

/*
 * Decapsulate `skb` if it is VXLAN for the tunnel of its port, before the
 * packet is parsed: the outer headers are read here from the bytes, with
 * decap()'s checks, so that one parse and one interpreter follow whether
 * or not the packet was a tunnel's (the verifier meets the same state
 * after both).  On CTCTL_DECAP_DONE the skb holds the inner frame and st
 * (reset by the caller) its metadata, DONE_DECAP, its VTEP and the tunnel
 * device's ifindex in in_ifindex.  A punt reason when the frame is the
 * tunnel's but stays whole for software.
 */
static __always_inline int tunnel_decap(ctctl_ctx *ctx, struct ctctl_state *st)
{
	void *data = ctx_data(ctx), *end = ctx_data_end(ctx);
	__u8 *buf = tunnel_buf(st), *h = buf + 2;
	struct ctctl_tunnel *t;
	__u32 tot_len;
	__u16 inner_eth;

	if (ctx_vlan_offloaded(ctx) || ctx_len(ctx) < CTCTL_VXLAN_BUF)
		return CTCTL_DECAP_NONE;
	t = tunnel_lookup(ctx_ifindex(ctx));
	if (!t || t->port != ctx_ifindex(ctx))
		return CTCTL_DECAP_NONE;
	/* Most of the port's own frames are not IPv4/UDP: told without a
	 * copy when the headers are in the linear area. */
	if (data + 24 <= end) {
		const __u8 *p = data;

		if (p[12] != (ETH_P_IP >> 8) || p[13] != (ETH_P_IP & 0xff) || p[23] != IPPROTO_UDP)
			return CTCTL_DECAP_NONE;
	}
	if (ctx_load(ctx, 0, h, CTCTL_VXLAN_BUF) < 0)
		return CTCTL_DECAP_NONE;
	/* IPv4 without options, not a fragment, UDP to the tunnel's address
	 * and port, the I flag: anything else is the port's own frame. */
	tot_len = (__u32)h[16] << 8 | h[17];
	if (h[12] != (ETH_P_IP >> 8) || h[13] != (ETH_P_IP & 0xff) || h[14] != 0x45 ||
	    h[23] != IPPROTO_UDP || ((h[20] << 8 | h[21]) & 0x3fff) ||
	    *(__u32 *)(h + 30) != *(__u32 *)t->local || *(__be16 *)(h + 36) != t->dstport ||
	    tot_len < CTCTL_VXLAN_BUF - 14 || 14 + tot_len > ctx_len(ctx) || !(h[42] & CTCTL_VXLAN_FLAG_I))
		return CTCTL_DECAP_NONE;
	/*
	 * The tunnel's frame from here.  Software's whole: a GSO packet (the
	 * kernel's segmentation would still see the tunnel's headers), an
	 * inner frame the parser does not read, and bytes after the outer
	 * packet (Ethernet padding, which decap() drops and a shrink at the
	 * front would keep).
	 */
	inner_eth = (__u16)h[62] << 8 | h[63];
	if (ctx_gso(ctx) || (inner_eth != ETH_P_IP && inner_eth != ETH_P_IPV6) || 14 + tot_len != ctx_len(ctx))
		return CTCTL_R_TUNNEL;
	st->tun.key_id = (__u32)h[46] << 16 | (__u32)h[47] << 8 | h[48];
	__builtin_memcpy(st->tun.src, h + 26, 4);
	__builtin_memcpy(st->tun.dst, h + 30, 4);
	st->tun.dport = t->dstport;
	st->tun.flags = CTCTL_TF_PRESENT;
	st->key.tun_id = st->tun.key_id | CTCTL_TUN_PRESENT;
	__builtin_memcpy(st->vtep, st->tun.src, 4);
	__builtin_memcpy(st->vtep_mac, h + 6, 6);
	st->in_ifindex = t->dev;
	/* The MAC header stays where it is: the 50 bytes after it go, and
	 * the inner Ethernet header is written over the outer one. */
	if (ctx_adjust_mac(ctx, -CTCTL_VXLAN_HLEN) < 0)
		return CTCTL_R_TUNNEL;
	if (ctx_store(ctx, 0, h + CTCTL_VXLAN_HLEN, 14) < 0)
		return CTCTL_DECAP_FAILED;
	st->done = CTCTL_DONE_DECAP;
	vtep_learn(st->vtep, st->vtep_mac);
	count(CTCTL_C_DECAP, 1);
	return CTCTL_DECAP_DONE;
}

/* tunnel_key set: the metadata of `encaps` slot `slot`; -1 when it has none. */
static __always_inline int tunnel_set(struct ctctl_state *st, __u32 slot)
{
	struct ctctl_encap *e = encap_lookup(slot);

	if (!e || !(e->flags & CTCTL_TF_PRESENT))
		return -1;
	st->tun.key_id = e->key_id;
	__builtin_memcpy(st->tun.src, e->src, 4);
	__builtin_memcpy(st->tun.dst, e->dst, 4);
	st->tun.dport = e->dport;
	st->tun.flags = e->flags;
	st->key.tun_id = e->key_id | CTCTL_TUN_PRESENT;
	return 0;
}

/*
 * The outer UDP source port for the inner packet, as source_port() in
 * ctctl/kernel/tunnel.py: the inner addresses' words, the protocol and the
 * first transport word, xor-folded into 49152-65535.  The words are xored
 * as loaded and swapped once: a byte swap commutes with xor.
 */
static __always_inline __u16 tunnel_sport(ctctl_ctx *ctx, const struct ctctl_state *st)
{
	const __u32 *s = (const __u32 *)st->key.src, *d = (const __u32 *)st->key.dst;
	__u32 raw = 0, l4 = 0, h;

	ctx_load(ctx, st->l4_off, &l4, 4);
	if (st->l3 == 4)
		raw = s[0] ^ d[0];
	else
		raw = s[0] ^ s[1] ^ s[2] ^ s[3] ^ d[0] ^ d[1] ^ d[2] ^ d[3];
	h = bpf_ntohl(raw ^ l4) ^ st->key.ip_proto;
	h ^= h >> 16;
	return CTCTL_VXLAN_PORT_LO | (h & 0x3fff);
}

/*
 * Encapsulate for the tunnel device st->encap_dev and redirect to its
 * port: CTCTL_REDIRECT, CTCTL_SHOT when the packet was left half built
 * (counted), or CTCTL_PUNT with CTCTL_R_ENCAP and the packet untouched.
 * The outer headers are encap()'s: the VTEP's learned MAC, the port's,
 * IPv4 with DF, ID 0, TTL 64, UDP from tunnel_sport() with no checksum.
 * A UDP checksum over the whole inner frame is more than this NIC does:
 * `csum` metadata (tunnel_key's default) goes to software.
 */
static __always_inline int tunnel_encap(ctctl_ctx *ctx, struct ctctl_state *st)
{
	__u8 *buf = tunnel_buf(st), *h = buf + 2;
	__u16 *ip = (__u16 *)(buf + 2 + 14);
	struct ctctl_tunnel *t;
	struct ctctl_vtep *v;
	__u32 len = ctx_len(ctx), sum = 0;
	__be16 dport;

	st->reason = CTCTL_R_ENCAP;
	t = tunnel_lookup(st->encap_dev);
	if (!t || t->dev != st->encap_dev || (st->tun.flags & (CTCTL_TF_PRESENT | CTCTL_TF_CSUM)) != CTCTL_TF_PRESENT ||
	    ctx_gso(ctx) || ctx_vlan_offloaded(ctx) || st->l3_off != 14)
		return CTCTL_PUNT;
	v = vtep_lookup(st->tun.dst);
	if (!v)
		return CTCTL_PUNT;
	if (ctx_load(ctx, 0, h + CTCTL_VXLAN_HLEN, 14) < 0)
		return CTCTL_PUNT;
	__builtin_memcpy(h, v->mac, 6);
	__builtin_memcpy(h + 6, t->mac, 6);
	__builtin_memset(h + 12, 0, CTCTL_VXLAN_HLEN - 12);
	h[12] = ETH_P_IP >> 8;
	h[14] = 0x45;
	*(__be16 *)(h + 16) = bpf_htons(20 + 8 + 8 + len);
	*(__be16 *)(h + 20) = bpf_htons(0x4000);	/* DF */
	h[22] = 64;
	h[23] = IPPROTO_UDP;
	__builtin_memcpy(h + 26, st->tun.src, 4);
	__builtin_memcpy(h + 30, st->tun.dst, 4);
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += ip[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	*(__u16 *)(h + 24) = ~sum & 0xffff;
	dport = st->tun.dport ? st->tun.dport : t->dstport;
	*(__be16 *)(h + 34) = bpf_htons(tunnel_sport(ctx, st));
	*(__be16 *)(h + 36) = dport;
	*(__be16 *)(h + 38) = bpf_htons(8 + 8 + len);
	h[42] = CTCTL_VXLAN_FLAG_I;
	h[46] = st->tun.key_id >> 16;
	h[47] = st->tun.key_id >> 8;
	h[48] = st->tun.key_id;
	if (ctx_adjust_mac(ctx, CTCTL_VXLAN_HLEN) < 0)
		return CTCTL_PUNT;	/* longer than the port takes, say: untouched */
	if (ctx_store(ctx, 0, h, CTCTL_VXLAN_BUF) < 0) {
		count(CTCTL_C_DROP, 1);
		return CTCTL_SHOT;
	}
	count(CTCTL_C_ENCAP, 1);
	count(CTCTL_C_REDIRECT, 1);
	return port_redirect(t->port);
}

#endif /* CTCTL_TUNNEL_H */
