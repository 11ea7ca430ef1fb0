/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The rule interpreter's view of one packet: its key, its ct metadata so
 * far, and where in the rules it stands.
 *
 * Contract: state_reset() makes a state that punts "at the very start"
 * (chain 0, rule 0, RESUME_MATCH, nothing done); state_load() fills the key
 * from what bpf/parse.h found, with all-zero ct metadata.  From then on the
 * key is changed only by NAT (bpf/nat.h) and pedit (bpf/pedit.h), and the
 * ct metadata only by the ct actions (bpf/rules.h), so a later match sees
 * the packet as it is now.
 *
 * The key is laid out as struct ctctl_match so that a rule's masked match
 * is eight 64-bit (value ^ key) & mask words, with no per-field code.
 *
 * The state lives in a per-CPU scratch map (bpf/maps.h), not on the stack:
 * values the verifier reads back from a map are unknown to it, so the paths
 * through the interpreter that differ only in what they wrote there (which
 * rule matched, which NAT ran) look the same to it and are verified once.
 * That is what keeps 64 rules x 9 chains within its complexity limit.
 */
#ifndef CTCTL_KEY_H
#define CTCTL_KEY_H

#include <uapi/linux/bpf.h>

#include "ctctl_abi.h"
#include "hook.h"
#include "parse.h"

/* What the data path's steps return for a packet that goes to software
 * (st->reason and the resume point say why and where). */
#define CTCTL_PUNT (-1)

/* A packet's tunnel metadata in the program (the punt header's tun_*). */
struct ctctl_tun_state {
	__u32 key_id;
	__u8 src[4];
	__u8 dst[4];
	__be16 dport;
	__u8 flags;			/* enum ctctl_tun_flags; 0: none */
	__u8 pad;
};

/* Bytes a checksum verification reads per step (bpf/csum.h). */
#define CTCTL_CSUM_CHUNK 256

struct ctctl_state {
	struct ctctl_match key;		/* the packet's fields and ct metadata */
	struct ctctl_tuple tuple;	/* the offload table key, built at a ct action */
	struct ctctl_chain_key ck;	/* the chains key, built at each hop */
	__be16 sport;			/* as struct ctctl_pkt */
	__be16 dport;
	__u16 l3_off;
	__u16 l4_off;
	__u8 l3;			/* 4 or 6 */
	__u8 l4_kind;			/* enum ctctl_l4_kind */
	__u8 tcp_flags;
	__u8 hops;			/* goto chain hops taken */
	/* Where NAT fixes the transport checksum (bpf/nat.h), found once. */
	__u16 csum_off;
	__u8 csum_pseudo;		/* the checksum covers the addresses */
	__u8 csum_flags;		/* extra l4_csum_replace flags: BPF_F_MARK_MANGLED_0 */
	/* Where the packet stands; a punt's resume point. */
	__u32 chain;
	__u16 rule;
	__u16 action;
	__u16 reason;			/* enum ctctl_reason, for a punt */
	__u16 done;			/* enum ctctl_done */
	__u32 l3_len;			/* IP total length: the bytes conntrack counts */
	/*
	 * act_ct's per-packet cache (bpf/rules.h do_ct): the offload table
	 * entry of the last ct hit, from ct_state on (the counters are not
	 * copied), and whether its NAT was applied to the packet.
	 */
	struct ctctl_flow ct_flow;
	/* The rules this packet ran, chain by chain (ctctl_rule.id): its
	 * entry's path (bpf/ctctl.c record_flow).  8-byte aligned, as
	 * ct_flow.path is, so the two compare as three words. */
	__u16 path[CTCTL_PATH_LEN];
	__u8 ct_nat_done;
	__u8 ct_hit;			/* a ct action found its entry (not the cache) */
	__u8 csum_bad;			/* a checksum the hardware verifies is wrong (bpf/csum.h) */
	__u8 tcp_opts;			/* as struct ctctl_pkt */
	__u8 tcp_has_sack;		/* a SACK option was read (bpf/window.h tcp_sack_scan) */
	__u8 tcp_hlen;
	__u16 tcp_win;
	__u32 tcp_seq;
	__u32 tcp_ack;
	__u32 tcp_sack;			/* its highest right edge, or tcp_ack */
	__u32 csum_left;		/* bytes of the segment still to sum (bpf/csum.h) */
	/* The flow cache (bpf/ctctl.c): the generation the packet started
	 * under, how many times it looked in the offload table, and the
	 * verdict its walk reached (enum ctctl_fp_verdict and its arg). */
	__u32 gen;
	__u32 fp_arg;
	__u8 ct_lookups;
	__u8 fp_verdict;
	__u16 pad;
	/* Checksum changes pedit made and no csum action fixed yet
	 * (bpf/pedit.h): the IPv4 header's, the transport's through the
	 * pseudo-header (addresses) and through its own header. */
	__u64 pend_iph;
	__u64 pend_pseudo;
	__u64 pend_l4;
	/* The packet's layout as a pedit key sees it, written at the action
	 * and read back in its loop (bpf/pedit.h pedit_layout). */
	__u32 pedit_i;			/* the key being applied */
	__u32 hdr_base[4];		/* where each enum ctctl_pedit_htype counts from */
	__u32 iph_lo, iph_len;		/* the IPv4 header's bytes (IPv6: none) */
	__u32 pseudo_lo, pseudo_len;	/* the addresses, in the pseudo-header */
	__u32 seg_lo, seg_len;		/* the transport segment */
	/*
	 * VXLAN (bpf/tunnel.h): the device the packet is classified on (its
	 * port, or the tunnel device it was decapsulated for), its tunnel
	 * metadata as it stands, where it came from when decapsulated, and
	 * the tunnel device a mirred sends it to.
	 */
	__u32 in_ifindex;
	__u32 encap_dev;
	struct ctctl_tun_state tun;
	__u8 vtep[4];
	__u8 vtep_mac[6];
	__u16 pad2;
	/* A punt's header, built by bpf/ctctl.c punt(). */
	struct ctctl_punt_hdr punt;
	/* Bytes of the packet being summed (bpf/csum.h): no room on the stack. */
	__u32 csum_buf[CTCTL_CSUM_CHUNK / 4];
};

static __always_inline void state_reset(struct ctctl_state *st)
{
	__builtin_memset(&st->key, 0, sizeof(st->key));
	st->hops = 0;
	st->chain = 0;
	st->rule = 0;
	st->action = CTCTL_RESUME_MATCH;
	st->reason = CTCTL_R_NONE;
	st->done = 0;
	st->ct_nat_done = 0;
	st->ct_hit = 0;
	st->csum_bad = 0;
	st->tcp_has_sack = 0;
	st->ct_lookups = 0;
	st->fp_verdict = CTCTL_FP_NONE;
	st->pend_iph = 0;
	st->pend_pseudo = 0;
	st->pend_l4 = 0;
	st->tun.flags = 0;
	__builtin_memset(st->path, 0, sizeof(st->path));
}

static __always_inline void state_load(struct ctctl_state *st, const struct ctctl_pkt *p)
{
	__builtin_memcpy(st->key.src, p->src, 16);
	__builtin_memcpy(st->key.dst, p->dst, 16);
	st->key.eth_proto = p->eth_proto;
	st->key.ip_proto = p->proto;
	st->key.icmp_type = p->icmp_type;
	st->key.icmp_code = p->icmp_code;
	st->sport = p->sport;
	st->dport = p->dport;
	st->l3_off = p->l3_off;
	st->l4_off = p->l4_off;
	st->l3_len = p->l3_len;
	st->l3 = p->ip_version;
	st->l4_kind = p->l4_kind;
	st->tcp_flags = p->tcp_flags;
	st->tcp_seq = p->tcp_seq;
	st->tcp_ack = p->tcp_ack;
	st->tcp_win = p->tcp_win;
	st->tcp_hlen = p->tcp_hlen;
	st->tcp_opts = p->tcp_opts;
	st->csum_pseudo = 1;
	st->csum_flags = 0;
	switch (p->proto) {
	case IPPROTO_TCP:
		st->csum_off = p->l4_off + 16;
		break;
	case IPPROTO_UDP:
		/* A UDP checksum of 0 (IPv4: "none") must stay 0. */
		st->csum_off = p->l4_off + 6;
		st->csum_flags = BPF_F_MARK_MANGLED_0;
		break;
	case IPPROTO_ICMP:
		st->csum_off = p->l4_off + 2;
		st->csum_pseudo = 0;
		break;
	default: /* ICMPv6 */
		st->csum_off = p->l4_off + 2;
		break;
	}
}

/* A port range of a rule that does not restrict: 0-65535 twice (as
 * sport_min, sport_max, dport_min, dport_max read as one word). */
#define CTCTL_ANY_PORTS 0xffff0000ffff0000ULL

/*
 * Does rule r match the packet?  Every key word, (value ^ key) & mask;
 * first, alone, the words of the two addresses that hold an IPv4 address
 * or an IPv6 prefix (0 and 2 of struct ctctl_match as __u64s), which tell
 * a rule from most packets: a rule they rule out costs a compare or two.
 * The other six words follow without a branch, so a rule that differs
 * only there costs two branches more than a plain compare of all eight.
 * Then the port ranges: a packet without ports (ICMP) matches only a rule
 * whose ranges are the whole 0-65535, as flower's dissector has no port
 * key to compare for it.
 */
static __always_inline int rule_matches(const struct ctctl_rule *r, const struct ctctl_state *st)
{
	const __u64 *v = (const __u64 *)&st->key;
	const __u64 *k = (const __u64 *)&r->key;
	const __u64 *m = (const __u64 *)&r->mask;
	__u64 diff;
	__u16 sp, dp;

	if ((v[0] ^ k[0]) & m[0])
		return 0;
	if ((v[2] ^ k[2]) & m[2])
		return 0;
	diff = ((v[1] ^ k[1]) & m[1]) | ((v[3] ^ k[3]) & m[3]) | ((v[4] ^ k[4]) & m[4]) |
	       ((v[5] ^ k[5]) & m[5]) | ((v[6] ^ k[6]) & m[6]) | ((v[7] ^ k[7]) & m[7]);
	if (diff)
		return 0;
	if (*(const __u64 *)&r->sport_min == CTCTL_ANY_PORTS)
		return 1;
	if (st->l4_kind != CTCTL_L4_PORTS)
		return 0;
	sp = bpf_ntohs(st->sport);
	dp = bpf_ntohs(st->dport);
	return sp >= r->sport_min && sp <= r->sport_max &&
	       dp >= r->dport_min && dp <= r->dport_max;
}

/*
 * The offload table key of the packet as it is now, in `zone`.  Only
 * packets with a tuple the table can hold have one: TCP/UDP and ICMP echo.
 */
static __always_inline int state_tuple(struct ctctl_state *st, __u16 zone)
{
	if (st->l4_kind != CTCTL_L4_PORTS && st->l4_kind != CTCTL_L4_ECHO)
		return -1;
	__builtin_memcpy(st->tuple.src, st->key.src, 16);
	__builtin_memcpy(st->tuple.dst, st->key.dst, 16);
	st->tuple.sport = st->sport;
	st->tuple.dport = st->dport;
	st->tuple.l3 = st->l3;
	st->tuple.proto = st->key.ip_proto;
	st->tuple.zone = zone;
	return 0;
}

#endif /* CTCTL_KEY_H */
