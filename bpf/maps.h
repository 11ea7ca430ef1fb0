/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The maps of the TC-ingress program, in one place.  Each one plays a part
 * of the NIC; the controller pins them under /sys/fs/bpf/ctctl/<box>/.
 * Every map but `scratch` is part of the contract with the driver: names,
 * keys and values are bpf/ctctl_abi.h's, and ctctl/abi.py (MAPS) declares
 * the same maps, which tests/unit/test_abi.py checks against this file;
 * ctctl/nic/maps.py is the one place in Python that reads or writes them.
 */
#ifndef CTCTL_MAPS_H
#define CTCTL_MAPS_H

#include "ctctl_abi.h"
#include "key.h"

/* The offload table's size, declared by the controller (-D at compile time). */
#ifndef CTCTL_FLOW_TABLE_SIZE
#define CTCTL_FLOW_TABLE_SIZE 65536
#endif

/* Punts to software: the metadata header followed by the packet. */
BPF_PERF_OUTPUT(punts);

/* Per-CPU counters, indexed by enum ctctl_reason then enum ctctl_counter. */
BPF_PERCPU_ARRAY(counters, __u64, CTCTL_C_MAX);

/* The offloaded rules: (ingress port, chain) -> its rules in software's order. */
BPF_HASH(chains, struct ctctl_chain_key, struct ctctl_chain, 1024);

/* The offload table: (zone, tuple) of one direction -> what a ct hit restores. */
BPF_HASH(flows, struct ctctl_tuple, struct ctctl_flow, CTCTL_FLOW_TABLE_SIZE);

/* Per-rule hit counters, indexed by ctctl_rule.id. */
BPF_PERCPU_ARRAY(rule_stats, struct ctctl_rule_stats, CTCTL_MAX_RULE_IDS);

/* Run-time capabilities of the "hardware" (enum ctctl_cap). */
BPF_ARRAY(hw_config, struct ctctl_hw_config, 1);

/*
 * The hardware's own aging: one connection context per offloaded
 * connection (sized by the controller when the NIC ages, 1 otherwise),
 * the timeouts and the cursor of its pass, and the ring its expiry
 * events go to.
 */
#ifndef CTCTL_AGING_SLOTS
#define CTCTL_AGING_SLOTS 1
#endif
#ifndef CTCTL_EXPIRY_PAGES
#define CTCTL_EXPIRY_PAGES 64
#endif
BPF_ARRAY(aging_config, struct ctctl_aging_config, 1);
BPF_ARRAY(aging_slots, struct ctctl_aging_slot, CTCTL_AGING_SLOTS);
BPF_RINGBUF_OUTPUT(expiries, CTCTL_EXPIRY_PAGES);

/*
 * TCP window tracking in hardware (bpf/window.h): a context per offloaded
 * TCP connection, by conn_id (sized by the controller when the NIC checks
 * windows, 1 otherwise).
 */
#ifndef CTCTL_WINDOW_SLOTS
#define CTCTL_WINDOW_SLOTS 1
#endif
BPF_HASH(windows, __u32, struct ctctl_tcp_window, CTCTL_WINDOW_SLOTS);
/* The driver's merge request (ctctl_window_merge): one at a time. */
BPF_ARRAY(window_merges, struct ctctl_window_merge, 1);

/* The interpreter's per-packet state (bpf/key.h says why it is not on the stack). */
BPF_PERCPU_ARRAY(scratch, struct ctctl_state, 1);

/*
 * BCC rewrites map calls (m.lookup(), m.perf_submit_skb()) only in the main
 * source file, never in a header: the headers reach the maps through these
 * accessors, which bpf/ctctl.c defines.
 */
static __always_inline void count(__u32 slot, __u64 n);
static __always_inline struct ctctl_chain *chain_lookup(struct ctctl_chain_key *k);
static __always_inline struct ctctl_flow *flow_lookup(struct ctctl_tuple *t);
static __always_inline struct ctctl_rule_stats *rule_stats_lookup(__u32 id);
static __always_inline __u32 hw_caps(void);
static __always_inline struct ctctl_tcp_window *window_lookup(__u32 conn_id);

#endif /* CTCTL_MAPS_H */
