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
/* struct bpf_spin_lock: BCC's kernel headers for the program, the uapi
 * header for the host compiler of tests/unit/test_abi.py. */
#ifdef __KERNEL__
#include <uapi/linux/bpf.h>
#else
#include <linux/bpf.h>
#endif

/* Why the program stopped and handed the packet to software. */
enum ctctl_reason {
	CTCTL_R_NONE = 0,
	CTCTL_R_NO_OFFLOAD = 1,		/* the port has no offloaded rules (a forward-only box) */
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
	CTCTL_R_CT_MISS = 12,		/* ct action: the (zone, tuple) is not in the offload table */
	CTCTL_R_CT_FLAGS = 13,		/* ct action hit a TCP SYN/FIN/RST: establishment and teardown are software's */
	CTCTL_R_TRAP = 14,		/* trap action, or a rule part the hardware cannot run */
	CTCTL_R_NO_MATCH = 15,		/* no rule of the chain matched */
	CTCTL_R_CT_INVALID = 16,	/* ct action: the hardware found the packet invalid (window,
					 * checksum) and its caps say software judges such packets */
	CTCTL_R_CT_WINDOW = 17,		/* ct action: a TCP segment the hardware's window tracking
					 * cannot judge (SACK blocks, not ESTABLISHED, no context) */
	CTCTL_R_TUNNEL = 18,		/* a VXLAN frame for a tunnel device that the program leaves
					 * whole to software (a GSO packet, an inner frame that is not
					 * IP, padding after the outer packet): software decapsulates */
	CTCTL_R_ENCAP = 19,		/* mirred to a tunnel device the hardware cannot encapsulate
					 * for (no metadata, the outer UDP checksum asked for, no MAC
					 * for the VTEP, GSO, a VLAN tag): software runs that mirred */
	CTCTL_R_XDP_TARGET = 20,	/* at XDP: mirred to a device that is not a port of the box
					 * (not in its devmap): software runs that mirred */
	CTCTL_R_MAX = 21,
};

/*
 * Slots of the per-CPU counter array.  The first CTCTL_R_MAX slots count
 * punts by reason (slot 0 unused); the rest follow.
 */
enum ctctl_counter {
	CTCTL_C_RX = CTCTL_R_MAX,	/* packets seen by the program */
	CTCTL_C_RX_BYTES,		/* their bytes (the frame's length) */
	CTCTL_C_PUNT,			/* packets handed to software */
	CTCTL_C_PERF_LOST,		/* perf_event_output failed: buffer full, packet dropped */
	CTCTL_C_TOO_BIG,		/* longer than CTCTL_MAX_PUNT: dropped, never truncated */
	CTCTL_C_CT_HIT,			/* ct actions answered from the offload table */
	CTCTL_C_REDIRECT,		/* mirred: redirected to a port by the program */
	CTCTL_C_DROP,			/* drop action */
	CTCTL_C_PASS,			/* pass action, or the end of a rule's actions */
	CTCTL_C_GOTO_LOOP,		/* more than CTCTL_MAX_HOPS gotos: dropped */
	CTCTL_C_NAT,			/* packets rewritten by NAT in the program */
	CTCTL_C_AGED,			/* connections the hardware's own aging removed */
	CTCTL_C_AGING_LOST,		/* ... that it kept a pass longer: the expiry ring was full */
	CTCTL_C_WINDOW_INVALID,		/* TCP segments outside the window: +inv in hardware (or punted) */
	CTCTL_C_WINDOW_IGNORED,		/* ... that conntrack lets through untracked-for-state (IGNORE) */
	CTCTL_C_CSUM_INVALID,		/* bad IPv4 header or L4 checksum: +inv in hardware (or punted) */
	CTCTL_C_CACHE_HIT,		/* packets finished from their entry's cached verdict (the flow cache) */
	CTCTL_C_CACHE_MISS,		/* ... that looked there and found none for their port */
	CTCTL_C_CACHE_STALE,		/* ... that found one older than the rules or caps: walked again */
	CTCTL_C_PEDIT,			/* pedit actions the program ran (header words rewritten) */
	CTCTL_C_PEDIT_SHORT,		/* ... whose key fell outside the packet: the rest skipped, as act_pedit */
	CTCTL_C_CSUM,			/* csum actions the program ran (checksums fixed incrementally) */
	CTCTL_C_DECAP,			/* VXLAN frames the program decapsulated for a tunnel device */
	CTCTL_C_ENCAP,			/* packets it encapsulated (mirred to a tunnel device) */
	CTCTL_C_CSUM_COMPLETED,		/* at XDP: TCP/UDP checksums a local sender left partial,
					 * completed by the program (bpf/hook.h) */
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
	CTCTL_DONE_PEDIT = 0x08,	/* header words rewritten by a pedit action (the bytes that
					 * follow are the rewritten packet: software does not redo it) */
	CTCTL_DONE_DECAP = 0x10,	/* decapsulated: the bytes are the inner frame, classified on
					 * the tunnel device of the port; tun_* and vtep* are valid */
};

/* Largest packet the program hands to software (a jumbo frame). */
#define CTCTL_MAX_PUNT 9216

/* Limits of the "hardware" rule interpreter (docs/offload.md). */
#define CTCTL_MAX_RULES 64		/* rules per chain */
#define CTCTL_MAX_ACTIONS 4		/* actions per rule */
#define CTCTL_MAX_HOPS 8		/* goto chain hops per packet */
#define CTCTL_PATH_LEN 12		/* rule ids an entry keeps: one per chain (CTCTL_MAX_HOPS + 1), to 8 bytes */
#define CTCTL_MAX_RULE_IDS 4096		/* slots of the per-rule counter array */
#define CTCTL_MAX_PEDIT_KEYS 8		/* pedit keys per rule, its pedit actions' together */
/* A resume point's action index meaning "match rule `rule` and on". */
#define CTCTL_RESUME_MATCH 0xffff
/* A TRAP action's arg: where software continues the packet. */
#define CTCTL_TRAP_AT_ACTION 0		/* at this action: the hardware matched the rule */
#define CTCTL_TRAP_REMATCH 1		/* at this rule's match: the hardware could not decide it */

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
	 * Software puts it back before it forwards the frame.  At XDP always
	 * 0: there the tag is still in the frame (bpf/hook.h).
	 */
	__u16 vlan_proto;
	__u16 vlan_tci;
	__u64 tstamp_ns;	/* bpf_ktime_get_ns() when the program stopped */
	/*
	 * The packet's tunnel metadata as it stopped (what a decapsulation
	 * found, or a tunnel_key set gave; tun_flags 0 when it has none), and
	 * with CTCTL_DONE_DECAP the VTEP it came from (outer source address
	 * and MAC), which software learns as the program did.
	 */
	__u32 tun_id;		/* the VNI */
	__u8 tun_src[4];
	__u8 tun_dst[4];
	__u8 vtep[4];
	__be16 tun_dport;
	__u8 tun_flags;		/* enum ctctl_tun_flags */
	__u8 pad;
	__u8 vtep_mac[6];
	__u8 pad2[6];
};

/*
 * A connection's tuple in one direction, as the packet carries it: the key
 * of the offload table (one entry per direction, as nf_flowtable keeps).
 */
struct ctctl_tuple {
	__u8 src[16];		/* IPv4: the first 4 bytes, the rest zero */
	__u8 dst[16];
	__be16 sport;		/* TCP/UDP source port; ICMP echo: the identifier */
	__be16 dport;		/* TCP/UDP destination port; ICMP echo: type, code bytes */
	__u8 l3;		/* 4 or 6 */
	__u8 proto;		/* IP protocol */
	__u16 zone;		/* conntrack zone */
};

/* What the NAT of an offloaded entry rewrites (enum ctctl_flow.nat). */
enum ctctl_nat {
	CTCTL_NAT_SRC = 0x01,	/* source address and port become nat_src, nat_sport */
	CTCTL_NAT_DST = 0x02,	/* destination address and port become nat_dst, nat_dport */
};

/* An offloaded connection direction: what a ct action's hit restores. */
struct ctctl_flow {
	__u64 packets;		/* counted by the program, atomically */
	__u64 bytes;		/* IP total length, as nf_conntrack counts */
	__u64 last_used_ns;	/* bpf_ktime_get_coarse_ns() of the last hit (CLOCK_MONOTONIC to the tick) */
	__u32 conn_id;		/* the controller's connection */
	__u32 mark;
	__u8 label[16];		/* big-endian 128-bit label */
	__u8 ct_state;		/* set on a hit: trk+est, +rpl for the reply direction, +snat/+dnat */
	__u8 dir;		/* 0 original, 1 reply */
	__u8 nat;		/* enum ctctl_nat bits */
	__u8 pad;
	__be16 nat_sport;
	__be16 nat_dport;
	__u8 nat_src[16];
	__u8 nat_dst[16];
	/* The rules (ctctl_rule.id, chain by chain; 0 = none) the packets it
	 * finished ran: the flow's owners (slide 19), written by the program
	 * when a packet's path differs from it. */
	__u16 path[CTCTL_PATH_LEN];
	/*
	 * The flow cache (CTCTL_CAP_FLOW_CACHE): the verdict the walk that
	 * wrote `path` reached, valid while the hardware's generation
	 * (ctctl_hw_config.gen) is the one in the tag and for packets of the
	 * port in it.  Written by the program, zero from the driver.
	 */
	__u64 fp_tag;		/* gen << 32 | ingress ifindex; 0: nothing cached */
	__u64 fp_verdict;	/* arg << 32 | (ifindex & 0xffffff) << 8 | enum ctctl_fp_verdict */
};

/*
 * A cached verdict (ctctl_flow.fp_verdict's low byte).  The ingress
 * ifindex is in both words, so a reader that meets one writer's tag with
 * another's verdict (two ports, two CPUs) walks instead.
 */
enum ctctl_fp_verdict {
	CTCTL_FP_NONE = 0,
	CTCTL_FP_REDIRECT = 1,		/* arg: egress ifindex */
	CTCTL_FP_DROP = 2,
	CTCTL_FP_PASS = 3,
	CTCTL_FP_KIND = 0x0f,		/* the bits above */
	CTCTL_FP_NAT = 0x10,		/* flag: the walk applied the entry's NAT */
};

/* Hardware capabilities the program honours at run time (ctctl_hw_config.caps). */
enum ctctl_cap {
	CTCTL_CAP_FLOW_COUNTERS = 0x01,	/* count packets/bytes per offloaded entry */
	CTCTL_CAP_HW_AGING = 0x02,	/* keep last-used times for the hardware's own aging */
	CTCTL_CAP_TCP_WINDOW = 0x04,	/* tcp_in_window on every TCP segment a ct action hits */
	CTCTL_CAP_CSUM_IPV4 = 0x08,	/* verify the IPv4 header checksum at a ct action */
	CTCTL_CAP_CSUM_L4 = 0x10,	/* verify the TCP/UDP/ICMP checksum at a ct action */
	CTCTL_CAP_INVALID_PUNT = 0x20,	/* an invalid packet is punted (CT_INVALID), not +inv */
	CTCTL_CAP_FLOW_CACHE = 0x40,	/* finish a hit from its entry's cached verdict (fp_*) */
	CTCTL_CAP_TUNNELS = 0x80,	/* decapsulate and encapsulate VXLAN for the `tunnels` map */
};

struct ctctl_hw_config {
	__u32 caps;		/* enum ctctl_cap bits */
	__u32 gen;		/* rules and caps: the driver bumps it after changing either */
};

/*
 * TCP window tracking in hardware (bpf/window.h): one context per
 * offloaded TCP connection, keyed by its conn_id, seeded by the driver from
 * the tracker and taken back by it when the connection leaves hardware.
 * The fields are nf_conntrack's (struct ip_ct_tcp_state, the last_* of
 * struct ip_ct_tcp), sequence numbers in host order.  Both directions live
 * in one context under one lock: a segment is judged against its own
 * direction and the other one, and updates both.
 */
struct ctctl_tcp_seen {
	__u32 td_end;		/* max of seq + len */
	__u32 td_maxend;	/* max of ack + max(win, 1) */
	__u32 td_maxwin;	/* max(win) */
	__u32 td_maxack;	/* max of ack */
	__u8 td_scale;		/* window scale factor */
	__u8 flags;		/* IP_CT_TCP_FLAG_* */
	__u8 pad[2];
};

/* ctctl_tcp_window.check */
enum ctctl_window_check {
	CTCTL_WCHECK_ON = 0,		/* judge every segment */
	CTCTL_WCHECK_LIBERAL = 1,	/* nf_conntrack_tcp_be_liberal: failures pass, no update */
	CTCTL_WCHECK_OFF = 2,		/* nf_conntrack_tcp_no_window_check */
};

struct ctctl_tcp_window {
	struct bpf_spin_lock lock;
	__u8 state;		/* the tracker's TCP state; only ESTABLISHED is judged here */
	__u8 check;		/* enum ctctl_window_check */
	__u8 last_dir;
	__u8 last_index;	/* the kernel's flag class of the last segment (3: ack) */
	__u32 last_seq;
	__u32 last_ack;
	__u32 last_end;
	__u16 last_win;
	__u8 retrans;		/* saturates at 255 */
	__u8 pad;
	__u64 segments;		/* segments judged (for tests and stats) */
	struct ctctl_tcp_seen seen[2];	/* original, reply */
};

/*
 * The driver's request to merge what software changed in a connection's
 * windows into the NIC's context (bpf/ctctl.c ctctl_window_merge, run by
 * the driver with BPF_PROG_TEST_RUN): applied under the context's lock, so
 * that no segment the NIC judges meanwhile is undone.  An edge software
 * moved goes to the later of the two (edges only grow), td_maxwin to the
 * larger; flag bits are set and cleared as software did.
 */
enum ctctl_wmerge {
	CTCTL_WM_LAST = 0x01,		/* the last-ACK bookkeeping (last_*, retrans) */
	CTCTL_WM_END = 0x02,		/* per direction, shifted by CTCTL_WMERGE_DIR_SHIFT * dir: */
	CTCTL_WM_MAXEND = 0x04,
	CTCTL_WM_MAXWIN = 0x08,
	CTCTL_WM_MAXACK = 0x10,
	CTCTL_WM_SCALE = 0x20,
};
#define CTCTL_WMERGE_DIR_SHIFT 5

struct ctctl_window_merge {
	__u32 conn_id;
	__u32 changed;		/* enum ctctl_wmerge bits */
	__u32 last_seq;
	__u32 last_ack;
	__u32 last_end;
	__u16 last_win;
	__u8 last_dir;
	__u8 last_index;
	__u8 retrans;
	__u8 set_flags[2];	/* flag bits software set, per direction */
	__u8 clear_flags[2];	/* ... and cleared */
	__u8 pad[3];
	struct ctctl_tcp_seen seen[2];	/* software's values */
};

/*
 * What a rule matches: the packet's key and its ct metadata, compared as
 * (field & mask) == key.  Ports are ranges, kept beside the masked part.
 */
struct ctctl_match {
	__u8 src[16];
	__u8 dst[16];
	__u16 eth_proto;	/* host order, after a VLAN tag */
	__u8 ip_proto;
	__u8 ct_state;		/* enum ctctl_ct_state bits */
	__u8 icmp_type;
	__u8 icmp_code;
	__u16 ct_zone;
	__u32 ct_mark;
	__u8 ct_label[16];	/* big-endian */
	__u32 tun_id;		/* the VNI | CTCTL_TUN_PRESENT; 0: no tunnel metadata */
};

enum ctctl_action_kind {
	CTCTL_A_NONE = 0,	/* end of the rule's actions */
	CTCTL_A_CT = 1,
	CTCTL_A_CT_CLEAR = 2,
	CTCTL_A_GOTO = 3,	/* arg: chain */
	CTCTL_A_MIRRED = 4,	/* arg: ifindex, egress redirect */
	CTCTL_A_DROP = 5,
	CTCTL_A_PASS = 6,
	CTCTL_A_TRAP = 7,	/* send to software; arg: CTCTL_TRAP_AT_ACTION or CTCTL_TRAP_REMATCH */
	CTCTL_A_PEDIT = 8,	/* arg: the rule's pedit keys [arg & 0xff, + (arg >> 8) & 0xff) */
	CTCTL_A_CSUM = 9,	/* arg: enum ctctl_csum_target bits */
	CTCTL_A_TUNNEL_UNSET = 10,	/* tunnel_key unset: the metadata is dropped */
	CTCTL_A_TUNNEL_SET = 11,	/* tunnel_key set; arg: its slot in the `encaps` map */
};

/*
 * A pedit key as act_pedit holds one (struct tc_pedit_key with its
 * extended header type): the 32-bit word at `offset` from the start of
 * its header becomes (word & mask) ^ val, or with ADD the word plus val
 * with the bits of mask kept.  val and mask are in the packet's byte order,
 * and the word is read as the host reads memory: ADD on a one-byte field
 * (TTL, hop limit) is the kernel's little-endian addition, as in
 * ctctl/kernel/rewrite.py.
 */
enum ctctl_pedit_htype {
	CTCTL_PH_ETH = 0,	/* the Ethernet header */
	CTCTL_PH_NETWORK = 1,	/* the IP header, whichever version the key was written for */
	CTCTL_PH_TRANSPORT = 2,	/* the transport header, whichever protocol */
};

enum ctctl_pedit_cmd {
	CTCTL_PC_SET = 0,
	CTCTL_PC_ADD = 1,
};

struct ctctl_pedit_key {
	__u8 htype;		/* enum ctctl_pedit_htype */
	__u8 cmd;		/* enum ctctl_pedit_cmd */
	__u16 offset;		/* a multiple of 4 */
	__u32 val;
	__u32 mask;		/* the bits kept */
};

/* What a csum action fixes (act_csum's update flags the program runs). */
enum ctctl_csum_target {
	CTCTL_CSUMT_IPH = 0x01,		/* the IPv4 header checksum */
	CTCTL_CSUMT_ICMP = 0x02,	/* ICMP and ICMPv6 */
	CTCTL_CSUMT_TCP = 0x04,
	CTCTL_CSUMT_UDP = 0x08,
};

enum ctctl_ct_flags {
	CTCTL_CTF_COMMIT = 0x01,
	CTCTL_CTF_NAT = 0x02,	/* apply the entry's NAT on a hit */
	CTCTL_CTF_FORCE = 0x04,
};

struct ctctl_action {
	__u8 kind;		/* enum ctctl_action_kind */
	__u8 flags;		/* ct: enum ctctl_ct_flags */
	__u16 zone;		/* ct */
	__u32 arg;
};

struct ctctl_rule {
	struct ctctl_match key;
	struct ctctl_match mask;
	__u16 sport_min;	/* host order, inclusive; 0-65535 matches any */
	__u16 sport_max;
	__u16 dport_min;
	__u16 dport_max;
	__u32 id;		/* slot in the per-rule counter array */
	__u32 pad;
	struct ctctl_action actions[CTCTL_MAX_ACTIONS];
	/* The keys of the rule's pedit actions, in order (CTCTL_A_PEDIT's arg). */
	struct ctctl_pedit_key pedit[CTCTL_MAX_PEDIT_KEYS];
};

struct ctctl_chain_key {
	__u32 ifindex;		/* ingress port */
	__u32 chain;
};

/* The rules of one chain of one port, in the order software runs them. */
struct ctctl_chain {
	__u32 n_rules;
	__u32 pad;
	struct ctctl_rule rules[CTCTL_MAX_RULES];
};

/* Per-rule counters (per-CPU array indexed by ctctl_rule.id). */
struct ctctl_rule_stats {
	__u64 packets;
	__u64 bytes;
};

/*
 * The hardware's own aging (bpf/ctctl.c ctctl_age, run by the driver's
 * firmware timer): a connection context per offloaded connection, the
 * timeouts it ages them by, and what it reports when it removes one.
 */
#define CTCTL_AGING_CLASSES 3		/* timeouts: TCP, UDP, the rest (ICMP) */

struct ctctl_aging_slot {
	__u64 conn_id;			/* 0: a free slot (64 bits: freed with a cmpxchg) */
	__u64 since_ns;			/* when it was offloaded: its last use until a hit */
	struct ctctl_tuple key[2];	/* its entries in the offload table: original, reply */
};

struct ctctl_aging_config {
	__u64 timeout_ns[CTCTL_AGING_CLASSES];
	__u32 cursor;			/* the slot the next run looks at */
	__u32 pad;
};

/* One connection the hardware aged out: the "callback into netfilter". */
struct ctctl_expiry {
	__u32 conn_id;
	__u8 present[2];		/* which entries were there to remove */
	__u8 pad[2];
	__u64 at_ns;			/* when it removed them */
	__u64 last_used_ns;
	__u64 packets[2];		/* the entries' final counters: original, reply */
	__u64 bytes[2];
};

/*
 * VXLAN (docs/tunnels.md).  A tunnel device of the box has an ifindex of
 * its own in the chains map, CTCTL_TUNNEL_DEV + its slot (no real device
 * has one that high here): its chains are where a decapsulated packet is
 * classified, and a mirred to it encapsulates.  The `tunnels` map holds
 * each tunnel twice, under its underlay port's ifindex (decapsulation)
 * and under its own (encapsulation).
 */
#define CTCTL_TUNNEL_DEV 0x7fff0000
#define CTCTL_TUN_PRESENT 0x80000000	/* ctctl_match.tun_id: the packet has metadata */
#define CTCTL_TUN_ID_MASK 0x00ffffff
#define CTCTL_MAX_ENCAPS 256		/* tunnel_key set metadata the NIC holds (`encaps`) */

struct ctctl_tunnel {
	__u32 port;		/* the underlay port's ifindex */
	__u32 dev;		/* the tunnel device's (CTCTL_TUNNEL_DEV + slot) */
	__u8 local[4];		/* the outer destination it decapsulates */
	__be16 dstport;		/* ... and UDP port */
	__u8 mac[6];		/* the port's MAC: the outer source of what it sends */
};

/* Tunnel metadata flags (punt header, `encaps`). */
enum ctctl_tun_flags {
	CTCTL_TF_PRESENT = 0x01,	/* the packet has metadata */
	CTCTL_TF_CSUM = 0x02,		/* the outer UDP checksum is asked for (tunnel_key's csum) */
};

/* What a tunnel_key set gives a packet (CTCTL_A_TUNNEL_SET's slot). */
struct ctctl_encap {
	__u32 key_id;
	__u8 src[4];
	__u8 dst[4];
	__be16 dport;		/* 0: the tunnel device's */
	__u8 flags;		/* enum ctctl_tun_flags, PRESENT set */
	__u8 pad;
};

/* A VTEP's MAC (the `vteps` map: outer IPv4 address -> MAC), learned at decapsulation. */
struct ctctl_vtep {
	__u8 mac[6];
	__u8 pad[2];
};

#endif /* CTCTL_ABI_H */
