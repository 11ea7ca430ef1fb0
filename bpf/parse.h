/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Packet parsing helpers for the TC-ingress program.
 *
 * Contract, for every helper here: it parses exactly one header at the
 * cursor, bounds-checks it against data_end, fills its part of struct
 * ctctl_pkt, advances the cursor past the header and returns CTCTL_R_NONE;
 * or it returns the enum ctctl_reason that makes the packet a punt.  A
 * helper never guesses: whatever it cannot parse with certainty (fragments,
 * options, extension headers, inconsistent lengths) is software's.
 *
 * This is the only place that reads headers out of the packet: what the rule
 * interpreter matches on and what the offload table is keyed by (addresses,
 * ports, the ICMP echo identifier, type and code) is taken here, once, into
 * struct ctctl_pkt; bpf/key.h turns it into the interpreter's key.
 */
#ifndef CTCTL_PARSE_H
#define CTCTL_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>

#include "ctctl_abi.h"

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif
#define CTCTL_IP_MF 0x2000
#define CTCTL_IP_OFFSET 0x1fff
#define CTCTL_ETH_P_8021Q 0x8100
#define CTCTL_ETH_P_8021AD 0x88A8

/*
 * pos walks the linear area [start, end); len is the whole packet's length,
 * which may reach beyond `end` into paged data that no helper reads.
 * l3_end is where the IP packet ends (offset from start): Ethernet padding
 * after it belongs to no header.
 */
struct cursor {
	void *start;
	void *pos;
	void *end;
	__u32 len;
	__u32 l3_end;
};

static __always_inline __u32 cursor_offset(struct cursor *c)
{
	return (__u32)(c->pos - c->start);
}

/* Bytes of the packet from the cursor to its end, linear or not. */
static __always_inline __u32 cursor_remaining(struct cursor *c)
{
	return c->len - cursor_offset(c);
}

/* Bytes of the IP packet from the cursor on (the transport's share). */
static __always_inline __u32 cursor_l3_remaining(struct cursor *c)
{
	__u32 off = cursor_offset(c);

	return off < c->l3_end ? c->l3_end - off : 0;
}

/*
 * What the parsers learnt about a packet.  Addresses and ports stay in
 * network order, as struct ctctl_tuple keeps them.
 */
struct ctctl_pkt {
	__u32 src[4];		/* IPv4: src[0], the rest zero */
	__u32 dst[4];
	__u16 eth_proto;	/* host order, after at most one VLAN tag */
	__u8 ip_version;	/* 4, 6, or 0 when not IP */
	__u8 proto;		/* IP protocol */
	__u32 l3_len;		/* IP total length, header included */
	__u16 l3_off;		/* offsets from the start of the frame */
	__u16 l4_off;
	__be16 sport;		/* TCP/UDP ports; ICMP echo: identifier ... */
	__be16 dport;		/* ... and the (type, code) bytes; other ICMP: 0 */
	__u8 tcp_flags;
	__u8 icmp_type;		/* ICMP/ICMPv6 only, 0 otherwise */
	__u8 icmp_code;
	__u8 l4_kind;		/* enum ctctl_l4_kind */
	/* TCP only, host order: what window tracking (bpf/window.h) reads. */
	__u32 tcp_seq;
	__u32 tcp_ack;
	__u16 tcp_win;
	__u8 tcp_hlen;		/* header length, options included */
	__u8 tcp_opts;		/* enum ctctl_tcp_opts */
};

/* What a TCP header's options are, as far as window tracking cares. */
enum ctctl_tcp_opts {
	CTCTL_TCPOPT_NONE = 0,		/* no options */
	CTCTL_TCPOPT_TS = 1,		/* NOP NOP TIMESTAMP only, as Linux sends */
	CTCTL_TCPOPT_OTHER = 2,		/* anything else (a SACK block, say) */
};
#define CTCTL_TCPOPT_NOP_NOP_TS 0x0101080aU	/* NOP, NOP, kind 8, length 10 */

/* Which of sport/dport mean something for the tuple. */
enum ctctl_l4_kind {
	CTCTL_L4_PORTS = 1,	/* TCP, UDP: ports */
	CTCTL_L4_ECHO = 2,	/* ICMP(v6) echo request/reply: id, type/code */
	CTCTL_L4_ICMP = 3,	/* any other ICMP(v6): no tuple the table keys */
};

#define CTCTL_ICMP_ECHOREPLY 0
#define CTCTL_ICMP_ECHO 8
#define CTCTL_ICMPV6_ECHO_REQUEST 128
#define CTCTL_ICMPV6_ECHO_REPLY 129

struct vlan_hdr_ {
	__be16 tci;
	__be16 proto;
};

static __always_inline int parse_eth(struct cursor *c, struct ctctl_pkt *p)
{
	struct ethhdr *eth = c->pos;

	if ((void *)(eth + 1) > c->end)
		return CTCTL_R_TRUNC_ETH;
	c->pos = eth + 1;
	p->eth_proto = bpf_ntohs(eth->h_proto);
	if (p->eth_proto == CTCTL_ETH_P_8021Q || p->eth_proto == CTCTL_ETH_P_8021AD) {
		struct vlan_hdr_ *vh = c->pos;

		if ((void *)(vh + 1) > c->end)
			return CTCTL_R_TRUNC_ETH;
		c->pos = vh + 1;
		p->eth_proto = bpf_ntohs(vh->proto);
	}
	if (p->eth_proto != ETH_P_IP && p->eth_proto != ETH_P_IPV6)
		return CTCTL_R_UNKNOWN_ETHERTYPE;
	return CTCTL_R_NONE;
}

static __always_inline int parse_ipv4(struct cursor *c, struct ctctl_pkt *p)
{
	struct iphdr *iph = c->pos;
	__u32 avail, tot;

	if ((void *)(iph + 1) > c->end)
		return CTCTL_R_TRUNC_L3;
	if (iph->version != 4 || iph->ihl < 5)
		return CTCTL_R_BAD_L3;
	tot = bpf_ntohs(iph->tot_len);
	avail = cursor_remaining(c);
	/* Ethernet may pad a short frame, so less than the packet is fine. */
	if (tot < iph->ihl * 4 || tot > avail)
		return CTCTL_R_BAD_L3;
	if (iph->ihl != 5)
		return CTCTL_R_IP_OPTIONS;
	if (iph->frag_off & bpf_htons(CTCTL_IP_MF | CTCTL_IP_OFFSET))
		return CTCTL_R_FRAGMENT;
	p->ip_version = 4;
	p->proto = iph->protocol;
	p->l3_len = tot;
	p->l3_off = cursor_offset(c);
	p->src[0] = iph->saddr;
	p->dst[0] = iph->daddr;
	c->l3_end = cursor_offset(c) + tot;
	c->pos = iph + 1;
	return CTCTL_R_NONE;
}

static __always_inline int parse_ipv6(struct cursor *c, struct ctctl_pkt *p)
{
	struct ipv6hdr *ip6h = c->pos;
	__u32 avail, tot;

	if ((void *)(ip6h + 1) > c->end)
		return CTCTL_R_TRUNC_L3;
	if (ip6h->version != 6)
		return CTCTL_R_BAD_L3;
	tot = bpf_ntohs(ip6h->payload_len) + sizeof(*ip6h);
	avail = cursor_remaining(c);
	if (tot > avail)
		return CTCTL_R_BAD_L3;
	p->ip_version = 6;
	p->proto = ip6h->nexthdr;
	p->l3_len = tot;
	p->l3_off = cursor_offset(c);
	__builtin_memcpy(p->src, &ip6h->saddr, 16);
	__builtin_memcpy(p->dst, &ip6h->daddr, 16);
	c->l3_end = cursor_offset(c) + tot;
	c->pos = ip6h + 1;
	switch (p->proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_ICMPV6:
		return CTCTL_R_NONE;
	case IPPROTO_FRAGMENT:
		return CTCTL_R_FRAGMENT;
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_ESP:
	case 135: /* mobility */
	case 139: /* HIP */
	case 140: /* shim6 */
		return CTCTL_R_IPV6_EXTHDR;
	}
	return CTCTL_R_UNKNOWN_L4;
}

static __always_inline int parse_l4(struct cursor *c, struct ctctl_pkt *p)
{
	/* The transport header must lie inside the IP packet, not its padding. */
	__u32 room = cursor_l3_remaining(c);

	p->l4_off = cursor_offset(c);
	switch (p->proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = c->pos;
		__u32 hlen;

		if (room < sizeof(*th) || (void *)(th + 1) > c->end)
			return CTCTL_R_TRUNC_L4;
		hlen = th->doff * 4;
		if (hlen < sizeof(*th))
			return CTCTL_R_BAD_L4;
		/* A data offset beyond the packet is inconsistent, not short. */
		if (hlen > room)
			return CTCTL_R_BAD_L4;
		if (c->pos + hlen > c->end)
			return CTCTL_R_TRUNC_L4;
		/* The flags byte follows the data offset byte. */
		p->tcp_flags = ((__u8 *)th)[13];
		p->tcp_seq = bpf_ntohl(th->seq);
		p->tcp_ack = bpf_ntohl(th->ack_seq);
		p->tcp_win = bpf_ntohs(th->window);
		p->tcp_hlen = hlen;
		p->tcp_opts = CTCTL_TCPOPT_OTHER;
		if (hlen == sizeof(*th)) {
			p->tcp_opts = CTCTL_TCPOPT_NONE;
		} else if (hlen == sizeof(*th) + 12 && (void *)(th + 1) + 4 <= c->end &&
			   *(__be32 *)(th + 1) == bpf_htonl(CTCTL_TCPOPT_NOP_NOP_TS)) {
			p->tcp_opts = CTCTL_TCPOPT_TS;
		}
		p->sport = th->source;
		p->dport = th->dest;
		p->l4_kind = CTCTL_L4_PORTS;
		c->pos += hlen;
		return CTCTL_R_NONE;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = c->pos;

		if (room < sizeof(*uh) || (void *)(uh + 1) > c->end)
			return CTCTL_R_TRUNC_L4;
		p->sport = uh->source;
		p->dport = uh->dest;
		p->l4_kind = CTCTL_L4_PORTS;
		c->pos = uh + 1;
		return CTCTL_R_NONE;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		/* Type, code, checksum and the id/sequence (or unused) word. */
		__u8 *ic = c->pos;
		__u8 echo_req = CTCTL_ICMP_ECHO, echo_rep = CTCTL_ICMP_ECHOREPLY;

		if (room < 8 || c->pos + 8 > c->end)
			return CTCTL_R_TRUNC_L4;
		if (p->proto == IPPROTO_ICMPV6) {
			echo_req = CTCTL_ICMPV6_ECHO_REQUEST;
			echo_rep = CTCTL_ICMPV6_ECHO_REPLY;
		}
		p->icmp_type = ic[0];
		p->icmp_code = ic[1];
		p->l4_kind = CTCTL_L4_ICMP;
		/* Only echo has an identifier conntrack keys on in both directions. */
		if (ic[0] == echo_req || ic[0] == echo_rep) {
			p->sport = *(__be16 *)(ic + 4);
			p->dport = *(__be16 *)ic;	/* type, code as they lie */
			p->l4_kind = CTCTL_L4_ECHO;
		}
		c->pos += 8;
		return CTCTL_R_NONE;
	}
	}
	return CTCTL_R_UNKNOWN_L4;
}

/* Parse from Ethernet to the end of the transport header. */
static __always_inline int parse_packet(struct cursor *c, struct ctctl_pkt *p)
{
	int r = parse_eth(c, p);

	if (r != CTCTL_R_NONE)
		return r;
	if (p->eth_proto == ETH_P_IP)
		r = parse_ipv4(c, p);
	else
		r = parse_ipv6(c, p);
	if (r != CTCTL_R_NONE)
		return r;
	return parse_l4(c, p);
}

#endif /* CTCTL_PARSE_H */
