/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Everything that crosses the boundary between the TC-ingress program and
 * the Python controller: punt reasons, counter slots, ct_state bits and the
 * metadata header that precedes every punted packet.
 *
 * ctctl/abi.py mirrors this file; tests/unit/test_abi.py compiles this
 * header with the host compiler and fails if the two disagree.  Change both
 * in the same commit.  Fixed-width types only, explicit padding, so the
 * layout is the same for the BPF target and for x86_64 user space.
 */
#ifndef CTCTL_ABI_H
#define CTCTL_ABI_H

#include <linux/types.h>

/* Why the program stopped and handed the packet to software. */
enum ctctl_reason {
	CTCTL_R_NONE = 0,
	CTCTL_R_NO_OFFLOAD = 1,		/* no offloaded rule handles it (foundation: every packet) */
	CTCTL_R_TRUNC_ETH = 2,		/* shorter than an Ethernet (or VLAN) header */
	CTCTL_R_UNKNOWN_ETHERTYPE = 3,	/* not IPv4/IPv6: ARP, LLDP, ... */
	CTCTL_R_TRUNC_L3 = 4,		/* shorter than the IP header claims or needs */
	CTCTL_R_BAD_L3 = 5,		/* IHL < 5, wrong version, total length beyond the packet */
	CTCTL_R_IP_OPTIONS = 6,		/* IPv4 with options (IHL > 5) */
	CTCTL_R_FRAGMENT = 7,		/* IPv4 fragment, or IPv6 fragment header */
	CTCTL_R_IPV6_EXTHDR = 8,	/* IPv6 extension header before the transport */
	CTCTL_R_TRUNC_L4 = 9,		/* transport header cut short */
	CTCTL_R_BAD_L4 = 10,		/* TCP data offset < 5, or beyond the packet */
	CTCTL_R_UNKNOWN_L4 = 11,	/* transport protocol the program does not parse */
	CTCTL_R_MAX = 12,
};

/*
 * Slots of the per-CPU counter array.  The first CTCTL_R_MAX slots count
 * punts by reason (slot 0 unused); the rest follow.
 */
enum ctctl_counter {
	CTCTL_C_RX = CTCTL_R_MAX,	/* packets seen by the program */
	CTCTL_C_RX_BYTES,		/* their bytes (skb->len) */
	CTCTL_C_PUNT,			/* packets handed to software */
	CTCTL_C_PERF_LOST,		/* perf_event_output failed: buffer full, packet dropped */
	CTCTL_C_TOO_BIG,		/* longer than CTCTL_MAX_PUNT: dropped, never truncated */
	CTCTL_C_MAX,
};

/*
 * ct_state bits, as flower and OVS number them (TCA_FLOWER_KEY_CT_FLAGS_*
 * for the first six, OVS's CS_SRC_NAT/CS_DST_NAT positions after them).
 */
enum ctctl_ct_state {
	CTCTL_CS_NEW = 0x01,
	CTCTL_CS_EST = 0x02,
	CTCTL_CS_REL = 0x04,
	CTCTL_CS_RPL = 0x08,
	CTCTL_CS_INV = 0x10,
	CTCTL_CS_TRK = 0x20,
	CTCTL_CS_SNAT = 0x40,
	CTCTL_CS_DNAT = 0x80,
};

/* What the program already did to the packet before it stopped. */
enum ctctl_done {
	CTCTL_DONE_CT = 0x01,		/* ct lookup ran: ct_state, zone, mark, label are valid */
	CTCTL_DONE_SNAT = 0x02,		/* source address/port rewritten */
	CTCTL_DONE_DNAT = 0x04,		/* destination address/port rewritten */
};

/* Largest packet the program hands to software (a jumbo frame). */
#define CTCTL_MAX_PUNT 9216

/*
 * The metadata header of a punt: the proposal's "restore all meta-data,
 * report where was the last stop".  The packet bytes follow it in the same
 * perf sample.  The resume point (chain, rule, action) names the action
 * software must run next.
 */
struct ctctl_punt_hdr {
	__u16 reason;		/* enum ctctl_reason */
	__u16 done;		/* enum ctctl_done bits */
	__u32 ifindex;		/* ingress port */
	__u32 pkt_len;		/* bytes of packet that follow this header */
	__u32 chain;		/* resume point: chain ... */
	__u16 rule;		/* ... rule index within the chain ... */
	__u16 action;		/* ... action index within the rule */
	__u16 zone;
	__u8 ct_state;		/* enum ctctl_ct_state bits */
	__u8 hops;		/* goto chain hops taken so far */
	__u32 mark;
	__u8 label[16];
	/*
	 * The VLAN tag the receiving kernel moved out of the packet into the
	 * skb (veth does this), host order; vlan_proto 0 when there was none.
	 * Software puts it back before it forwards the frame.
	 */
	__u16 vlan_proto;
	__u16 vlan_tci;
	__u64 tstamp_ns;	/* bpf_ktime_get_ns() when the program stopped */
};

#endif /* CTCTL_ABI_H */
