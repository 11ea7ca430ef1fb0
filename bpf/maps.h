/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The maps of the TC-ingress program, in one place.  Each one plays a part
 * of the NIC; they are pinned under /sys/fs/bpf/ctctl/<box>/ (below).
 * Every map but `scratch` is part of the contract with the driver: names,
 * keys and values are bpf/ctctl_abi.h's, and ctctl/abi.py (MAPS) declares
 * the same maps, which tests/unit/test_abi.py checks against this file;
 * ctctl/nic/maps.py is the one place in Python that reads or writes them.
 */
#ifndef CTCTL_MAPS_H
#define CTCTL_MAPS_H

#include "ctctl_abi.h"
#include "key.h"

/*
 * Every map but `scratch` lives as long as its pin, not as long as the
 * controller that made it: the loader passes CTCTL_PIN_DIR (the box's
 * directory under /sys/fs/bpf/ctctl/), and BCC then opens the map pinned
 * there, or creates and pins it when there is none.  That is how a second
 * controller adopts a running program's maps after the first one died
 * (a NIC's tables outlive its driver's user space); the punt buffer is
 * pinned too, so that the new controller's readers go into the very
 * perf event array the attached program writes to.  Without CTCTL_PIN_DIR
 * (BPF_PROG_TEST_RUN tests, benchmarks) the maps are the process's own.
 */
#ifdef CTCTL_PIN_DIR
#define CTCTL_PIN(_name) ":" CTCTL_PIN_DIR "/" #_name
#else
#define CTCTL_PIN(_name) ""
#endif
#define CTCTL_TABLE(_type, _key, _leaf, _name, _size) \
  BPF_F_TABLE(_type CTCTL_PIN(_name), _key, _leaf, _name, _size, 0)
#define CTCTL_HASH(_name, _key, _leaf, _size) CTCTL_TABLE("hash", _key, _leaf, _name, _size)
#define CTCTL_LRU_HASH(_name, _key, _leaf, _size) CTCTL_TABLE("lru_hash", _key, _leaf, _name, _size)
#define CTCTL_ARRAY(_name, _leaf, _size) CTCTL_TABLE("array", int, _leaf, _name, _size)
#define CTCTL_PERCPU_ARRAY(_name, _leaf, _size) CTCTL_TABLE("percpu_array", int, _leaf, _name, _size)
/* BCC's BPF_PERF_OUTPUT and BPF_RINGBUF_OUTPUT, with the pin in the section. */
#define CTCTL_PERF_OUTPUT(_name) \
struct _name##_table_t { \
  int key; \
  __u32 leaf; \
  int (*perf_submit) (void *, void *, __u32); \
  int (*perf_submit_skb) (void *, __u32, void *, __u32); \
  __u32 max_entries; \
}; \
__attribute__((section("maps/perf_output" CTCTL_PIN(_name)))) \
struct _name##_table_t _name = { .max_entries = 0 }
#define CTCTL_RINGBUF_OUTPUT(_name, _pages) \
struct _name##_table_t { \
  int key; \
  __u32 leaf; \
  int (*ringbuf_output) (void *, __u64, __u64); \
  void *(*ringbuf_reserve) (__u64); \
  void (*ringbuf_discard) (void *, __u64); \
  void (*ringbuf_submit) (void *, __u64); \
  __u32 max_entries; \
}; \
__attribute__((section("maps/ringbuf" CTCTL_PIN(_name)))) \
struct _name##_table_t _name = { .max_entries = ((_pages) * PAGE_SIZE) }

/* BCC's BPF_DEVMAP (its value an ifindex), with the pin in the section. */
#define CTCTL_DEVMAP(_name, _leaf, _size) \
struct _name##_table_t { \
  __u32 key; \
  _leaf leaf; \
  __u64 (*redirect_map) (int, int); \
  __u32 max_entries; \
}; \
__attribute__((section("maps/devmap" CTCTL_PIN(_name)))) \
struct _name##_table_t _name = { .max_entries = (_size) }

/* The offload table's size, declared by the controller (-D at compile time). */
#ifndef CTCTL_FLOW_TABLE_SIZE
#define CTCTL_FLOW_TABLE_SIZE 65536
#endif

/* Punts to software: the metadata header followed by the packet. */
CTCTL_PERF_OUTPUT(punts);

/* Per-CPU counters, indexed by enum ctctl_reason then enum ctctl_counter. */
CTCTL_PERCPU_ARRAY(counters, __u64, CTCTL_C_MAX);

/* The offloaded rules: (ingress port, chain) -> its rules in software's order. */
CTCTL_HASH(chains, struct ctctl_chain_key, struct ctctl_chain, 1024);

/* The offload table: (zone, tuple) of one direction -> what a ct hit restores. */
CTCTL_HASH(flows, struct ctctl_tuple, struct ctctl_flow, CTCTL_FLOW_TABLE_SIZE);

/* Per-rule hit counters, indexed by ctctl_rule.id. */
CTCTL_PERCPU_ARRAY(rule_stats, struct ctctl_rule_stats, CTCTL_MAX_RULE_IDS);

/* Run-time capabilities of the "hardware" (enum ctctl_cap). */
CTCTL_ARRAY(hw_config, struct ctctl_hw_config, 1);

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
CTCTL_ARRAY(aging_config, struct ctctl_aging_config, 1);
CTCTL_ARRAY(aging_slots, struct ctctl_aging_slot, CTCTL_AGING_SLOTS);
CTCTL_RINGBUF_OUTPUT(expiries, CTCTL_EXPIRY_PAGES);

/*
 * TCP window tracking in hardware (bpf/window.h): a context per offloaded
 * TCP connection, by conn_id (sized by the controller when the NIC checks
 * windows, 1 otherwise).
 */
#ifndef CTCTL_WINDOW_SLOTS
#define CTCTL_WINDOW_SLOTS 1
#endif
CTCTL_HASH(windows, __u32, struct ctctl_tcp_window, CTCTL_WINDOW_SLOTS);
/* The driver's merge request (ctctl_window_merge): one at a time. */
CTCTL_ARRAY(window_merges, struct ctctl_window_merge, 1);

/*
 * VXLAN (bpf/tunnel.h): the box's tunnel devices, each under its underlay
 * port's ifindex and under its own; what each tunnel_key set gives; and
 * the VTEPs' MACs the program learned from what it decapsulated (outer
 * IPv4 address, as the packet holds it -> MAC).
 */
CTCTL_HASH(tunnels, __u32, struct ctctl_tunnel, 64);
CTCTL_ARRAY(encaps, struct ctctl_encap, CTCTL_MAX_ENCAPS);
CTCTL_LRU_HASH(vteps, __u32, struct ctctl_vtep, 4096);

/*
 * At XDP, the ports a mirred may redirect to (bpf_redirect_map), by
 * ifindex: the loader writes each port's ifindex at its own slot, from
 * inside the box's namespace, where the kernel resolves it.
 */
#ifdef CTCTL_XDP
#ifndef CTCTL_PORT_SLOTS
#define CTCTL_PORT_SLOTS 256
#endif
CTCTL_DEVMAP(ports, __u32, CTCTL_PORT_SLOTS);
#endif

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
static __always_inline __u64 last_use(void);
static __always_inline struct ctctl_tcp_window *window_lookup(__u32 conn_id);
static __always_inline struct ctctl_tunnel *tunnel_lookup(__u32 ifindex);
static __always_inline struct ctctl_encap *encap_lookup(__u32 slot);
static __always_inline struct ctctl_vtep *vtep_lookup(const __u8 *addr);
static __always_inline void vtep_learn(const __u8 *addr, const __u8 *mac);
static __always_inline int port_redirect(__u32 ifindex);

#endif /* CTCTL_MAPS_H */
