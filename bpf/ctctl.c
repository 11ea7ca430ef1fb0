// SPDX-License-Identifier: GPL-2.0
/*
 * ctctl's "NIC": a TC-ingress program attached to every port of a box.
 *
 * It parses each packet (bpf/parse.h), runs the offloaded tc chains of its
 * ingress port on it (bpf/rules.h) with the offload table as its conntrack,
 * and either finishes it (redirect, drop, pass) or hands it to software with
 * the reason it stopped and everything software needs to continue from
 * there: the resume point, the ct metadata, what it already did to the
 * packet, and the packet as it is now.  It then drops its own copy; the
 * controller continues the packet and transmits the result.
 *
 * A port without offloaded rules punts everything (NO_OFFLOAD): a box that
 * only forwards in software keeps working.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "ctctl_abi.h"
#include "parse.h"
#include "key.h"
#include "maps.h"

/* The map accessors bpf/maps.h declares (BCC rewrites map calls only here). */
static __always_inline void count(__u32 slot, __u64 n)
{
	__u64 *v = counters.lookup(&slot);

	if (v)
		*v += n;	/* per-CPU slot: no other writer */
}

static __always_inline struct ctctl_chain *chain_lookup(struct ctctl_chain_key *k)
{
	return chains.lookup(k);
}

static __always_inline struct ctctl_flow *flow_lookup(struct ctctl_tuple *t)
{
	return flows.lookup(t);
}

static __always_inline struct ctctl_rule_stats *rule_stats_lookup(__u32 id)
{
	return rule_stats.lookup(&id);
}

static __always_inline __u32 hw_caps(void)
{
	__u32 zero = 0;
	struct ctctl_hw_config *cfg = hw_config.lookup(&zero);

	return cfg ? cfg->caps : 0;
}

static __always_inline struct ctctl_tcp_window *window_lookup(__u32 conn_id)
{
	return windows.lookup(&conn_id);
}

#include "nat.h"
#include "csum.h"
#include "rules.h"

/*
 * Headers the parsers may need in the linear area: Ethernet + VLAN, an IPv4
 * header with options or IPv6, and a TCP header with options.
 */
#define CTCTL_PULL_LEN (18 + 60 + 60)

static __always_inline int punt(struct __sk_buff *skb, const struct ctctl_state *st)
{
	struct ctctl_punt_hdr hdr = {};
	__u64 len = skb->len;
	int err;

	if (len > CTCTL_MAX_PUNT) {
		count(CTCTL_C_TOO_BIG, 1);
		return TC_ACT_SHOT;
	}
	hdr.reason = st->reason;
	hdr.done = st->done;
	hdr.ifindex = skb->ifindex;
	hdr.pkt_len = len;
	hdr.chain = st->chain;
	hdr.rule = st->rule;
	hdr.action = st->action;
	hdr.zone = st->key.ct_zone;
	hdr.ct_state = st->key.ct_state;
	hdr.hops = st->hops;
	hdr.mark = st->key.ct_mark;
	__builtin_memcpy(hdr.label, st->key.ct_label, 16);
	hdr.tstamp_ns = bpf_ktime_get_ns();
	if (skb->vlan_present) {
		hdr.vlan_proto = bpf_ntohs(skb->vlan_proto);
		hdr.vlan_tci = skb->vlan_tci;
	}
	/* BCC rewrites perf_submit_skb into a statement: keep it on its own. */
	err = punts.perf_submit_skb(skb, len, &hdr, sizeof(hdr));
	if (err < 0) {
		/* Buffer full: the packet is lost, and said so. */
		count(CTCTL_C_PERF_LOST, 1);
		return TC_ACT_SHOT;
	}
	count(st->reason, 1);
	count(CTCTL_C_PUNT, 1);
	return TC_ACT_SHOT;
}

/*
 * Which rules a flow's packets run (the flows a rule owns, slide 19): the
 * path of a packet the program finished, written into the entry its ct
 * action hit when it differs from what the entry holds.  The entry's path
 * came with the hit (st->ct_flow, a copy), so a flow that keeps its path
 * costs a compare and no second lookup.  Built without it
 * (-DCTCTL_NO_PATH) only to measure that cost.
 */
static __always_inline void record_path(struct ctctl_state *st)
{
	const __u64 *now = (const __u64 *)st->path, *had = (const __u64 *)st->ct_flow.path;
	struct ctctl_flow *f;

	if (((now[0] ^ had[0]) | (now[1] ^ had[1]) | (now[2] ^ had[2])) == 0)
		return;
	f = flow_lookup(&st->tuple);
	if (f)
		__builtin_memcpy(f->path, st->path, sizeof(f->path));
}

int ctctl_ingress(struct __sk_buff *skb)
{
	struct ctctl_pkt pkt = {};
	struct ctctl_state *st;
	struct cursor c;
	__u32 pull = skb->len < CTCTL_PULL_LEN ? skb->len : CTCTL_PULL_LEN;
	__u32 zero = 0, caps;
	int r;

	count(CTCTL_C_RX, 1);
	count(CTCTL_C_RX_BYTES, skb->len);

	st = scratch.lookup(&zero);
	if (!st)
		return TC_ACT_SHOT;	/* cannot happen: index 0 of a 1-slot array */
	state_reset(st);

	/* Non-linear skbs (veth with GRO, for one) may hold headers in frags. */
	if (skb->data_end - skb->data < pull)
		bpf_skb_pull_data(skb, pull);

	c.start = (void *)(long)skb->data;
	c.pos = c.start;
	c.end = (void *)(long)skb->data_end;
	c.len = skb->len;
	c.l3_end = skb->len;
	r = parse_packet(&c, &pkt);
	if (r != CTCTL_R_NONE) {
		st->reason = r;
		return punt(skb, st);
	}
	state_load(st, &pkt);
	/*
	 * Checksums the hardware verifies: here, once per packet, although
	 * only a ct action acts on the result (as conntrack's error check):
	 * a loop inside the interpreter's loops would be verified once per
	 * hop and action, far beyond the verifier's budget.
	 */
	caps = hw_caps();
	if ((caps & (CTCTL_CAP_CSUM_IPV4 | CTCTL_CAP_CSUM_L4)) && !csum_ok(skb, st, caps))
		st->csum_bad = 1;
	/* The same for a TCP segment's SACK blocks, which window tracking reads. */
	if ((caps & CTCTL_CAP_TCP_WINDOW) && pkt.proto == IPPROTO_TCP)
		tcp_sack_scan(skb, st);
	r = interpret(skb, st);
	if (r == CTCTL_PUNT)
		return punt(skb, st);
#ifndef CTCTL_NO_PATH
	if (st->ct_hit)
		record_path(st);
#endif
	return r;
}

/*
 * The hardware's own aging: the driver's firmware timer runs this with
 * BPF_PROG_TEST_RUN and `repeat` = the number of slots, after setting the
 * cursor to 0; each run looks at the next connection context.  A
 * connection whose entries have not been hit for its class's timeout is
 * removed from the offload table here, and reported with its entries'
 * final counters in the `expiries` ring: software never reads the table
 * for aging.  When the ring is full the connection stays until the next
 * pass (counted).  A hit on another CPU between reading an entry and
 * deleting it is lost from the counters: the usual map race, as when
 * software takes an entry out.
 */
static __always_inline __u64 entry_last_use(struct ctctl_flow *f, __u64 last)
{
	return f && f->last_used_ns > last ? f->last_used_ns : last;
}

int ctctl_age(struct __sk_buff *skb)
{
	struct ctctl_aging_config *cfg;
	struct ctctl_aging_slot *slot;
	struct ctctl_flow *f0, *f1;
	struct ctctl_expiry *ev;
	__u64 now, last, timeout;
	__u32 zero = 0, i, class;
	__u64 id;

	cfg = aging_config.lookup(&zero);
	if (!cfg)
		return 0;
	i = cfg->cursor++;		/* only the firmware runs this, on one CPU */
	slot = aging_slots.lookup(&i);
	if (!slot)
		return 0;
	id = slot->conn_id;
	if (!id)
		return 0;
	f0 = flows.lookup(&slot->key[0]);
	f1 = flows.lookup(&slot->key[1]);
	/* Its last hit, either direction; never hit: its offload time. */
	last = entry_last_use(f1, entry_last_use(f0, 0));
	if (!last)
		last = slot->since_ns;
	class = slot->key[0].proto == IPPROTO_TCP ? 0 : slot->key[0].proto == IPPROTO_UDP ? 1 : 2;
	timeout = cfg->timeout_ns[class];
	now = bpf_ktime_get_ns();
	if (now - last < timeout)
		return 0;
	ev = expiries.ringbuf_reserve(sizeof(*ev));
	if (!ev) {
		count(CTCTL_C_AGING_LOST, 1);
		return 0;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->conn_id = id;
	ev->at_ns = now;
	ev->last_used_ns = last;
	if (f0) {
		ev->present[0] = 1;
		ev->packets[0] = f0->packets;
		ev->bytes[0] = f0->bytes;
		flows.delete(&slot->key[0]);
	}
	if (f1) {
		ev->present[1] = 1;
		ev->packets[1] = f1->packets;
		ev->bytes[1] = f1->bytes;
		flows.delete(&slot->key[1]);
	}
	/* Free the slot unless the driver already gave it to another
	 * connection meanwhile. */
	__sync_val_compare_and_swap(&slot->conn_id, id, 0);
	expiries.ringbuf_submit(ev, 0);
	count(CTCTL_C_AGED, 1);
	return 1;
}

/*
 * The driver's window merge (struct ctctl_window_merge): what software
 * changed in a connection's windows after judging one of its segments,
 * applied to the NIC's context under its lock.  Written by the driver into
 * `window_merges`, run with BPF_PROG_TEST_RUN; 1 when the context was there.
 */
int ctctl_window_merge(struct __sk_buff *skb)
{
	struct ctctl_window_merge *m;
	struct ctctl_tcp_window *w;
	__u32 zero = 0;

	m = window_merges.lookup(&zero);
	if (!m)
		return 0;
	w = windows.lookup(&m->conn_id);
	if (!w)
		return 0;
	bpf_spin_lock(&w->lock);
	window_merge(w, m);
	bpf_spin_unlock(&w->lock);
	return 1;
}
