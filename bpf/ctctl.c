// SPDX-License-Identifier: GPL-2.0
/*
 * ctctl's "NIC": a program attached to every port of a box, at TC ingress
 * or (built with -DCTCTL_XDP) at XDP: bpf/hook.h is what differs.
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

static __always_inline struct ctctl_hw_config *hw_config_lookup(void)
{
	__u32 zero = 0;

	return hw_config.lookup(&zero);
}

static __always_inline __u32 hw_caps(void)
{
	struct ctctl_hw_config *cfg = hw_config_lookup();

	return cfg ? cfg->caps : 0;
}

/*
 * An entry's last use, on the coarse clock: the last tick's time (4 ms at
 * HZ=250), as nf_flowtable keeps its flows' in jiffies.  Timeouts are
 * seconds; the precise clock cost a hit a fifth of its time (rdtsc in a
 * guest).  Compared with bpf_ktime_get_ns() (aging) it is never ahead.
 */
static __always_inline __u64 last_use(void)
{
	return bpf_ktime_get_coarse_ns();
}

static __always_inline struct ctctl_tcp_window *window_lookup(__u32 conn_id)
{
	return windows.lookup(&conn_id);
}

static __always_inline struct ctctl_tunnel *tunnel_lookup(__u32 ifindex)
{
	return tunnels.lookup(&ifindex);
}

static __always_inline struct ctctl_encap *encap_lookup(__u32 slot)
{
	return encaps.lookup(&slot);
}

static __always_inline struct ctctl_vtep *vtep_lookup(const __u8 *addr)
{
	__u32 key;

	__builtin_memcpy(&key, addr, 4);
	return vteps.lookup(&key);
}

/* Written only when it changed: a VTEP's steady stream costs a lookup. */
static __always_inline void vtep_learn(const __u8 *addr, const __u8 *mac)
{
	struct ctctl_vtep v = {}, *had;
	__u32 key;

	__builtin_memcpy(&key, addr, 4);
	__builtin_memcpy(v.mac, mac, 6);
	had = vteps.lookup(&key);
	if (had && *(__u64 *)had == *(__u64 *)&v)
		return;
	vteps.update(&key, &v);
}

/*
 * Out of a port of the box: CTCTL_REDIRECT, or at XDP XDP_ABORTED (0, the
 * flags' low bits) when `ifindex` is not in the devmap of its ports.
 */
static __always_inline int port_redirect(__u32 ifindex)
{
#ifdef CTCTL_XDP
	return ports.redirect_map(ifindex, 0);
#else
	return bpf_redirect(ifindex, 0);
#endif
}

#include "nat.h"
#include "csum.h"
#include "rules.h"

/*
 * Headers the parsers may need in the linear area: Ethernet + VLAN, an IPv4
 * header with options or IPv6, and a TCP header with options.
 */
#define CTCTL_PULL_LEN (18 + 60 + 60)

/* The header is built in the scratch state: the stack has no room for it. */
static __always_inline int punt(ctctl_ctx *ctx, struct ctctl_state *st)
{
	struct ctctl_punt_hdr *hdr = &st->punt;
	__u64 len = ctx_len(ctx);
	int err;

	if (len > CTCTL_MAX_PUNT) {
		count(CTCTL_C_TOO_BIG, 1);
		return CTCTL_SHOT;
	}
	__builtin_memset(hdr, 0, sizeof(*hdr));
	hdr->reason = st->reason;
	hdr->done = st->done;
	hdr->ifindex = ctx_ifindex(ctx);
	hdr->pkt_len = len;
	hdr->chain = st->chain;
	hdr->rule = st->rule;
	hdr->action = st->action;
	hdr->zone = st->key.ct_zone;
	hdr->ct_state = st->key.ct_state;
	hdr->hops = st->hops;
	hdr->mark = st->key.ct_mark;
	__builtin_memcpy(hdr->label, st->key.ct_label, 16);
	hdr->tstamp_ns = bpf_ktime_get_ns();
#ifndef CTCTL_XDP
	if (ctx->vlan_present) {
		hdr->vlan_proto = bpf_ntohs(ctx->vlan_proto);
		hdr->vlan_tci = ctx->vlan_tci;
	}
#endif
	if (st->tun.flags) {
		hdr->tun_id = st->tun.key_id;
		__builtin_memcpy(hdr->tun_src, st->tun.src, 4);
		__builtin_memcpy(hdr->tun_dst, st->tun.dst, 4);
		hdr->tun_dport = st->tun.dport;
		hdr->tun_flags = st->tun.flags;
	}
	if (st->done & CTCTL_DONE_DECAP) {
		__builtin_memcpy(hdr->vtep, st->vtep, 4);
		__builtin_memcpy(hdr->vtep_mac, st->vtep_mac, 6);
	}
	/* BCC rewrites perf_submit_skb into a statement: keep it on its own. */
	err = punts.perf_submit_skb(ctx, len, hdr, sizeof(*hdr));
	if (err < 0) {
		/* Buffer full: the packet is lost, and said so. */
		count(CTCTL_C_PERF_LOST, 1);
		return CTCTL_SHOT;
	}
	count(st->reason, 1);
	count(CTCTL_C_PUNT, 1);
	return CTCTL_SHOT;
}

/*
 * The flow cache, in the entry a packet's ct action hits.  A walk is
 * replayed from the entry alone when nothing in it depended on more than
 * the ingress port, the packet's tuple and the entry: one lookup in the
 * offload table (zone 0, the tuple as it arrived), and no per-packet
 * judgement (window tracking and checksum verification are off), and no
 * pedit or tunnel (the replay rewrites nothing but the entry's NAT; a
 * mirred to a tunnel device leaves fp_verdict NONE).  With
 * one lookup, any NAT the walk applied is that entry's, once: the replay
 * applies it again (CTCTL_FP_NAT).  TCP SYN, FIN and RST never get there:
 * they stop at the ct action.
 * The tag's generation is the hardware's when the packet started; the
 * driver bumps it after every change of rules or caps, so a verdict
 * written by a walk that may have seen old rules is stale at once.
 */
#define CTCTL_CACHE_CAPS (CTCTL_CAP_TCP_WINDOW | CTCTL_CAP_CSUM_IPV4 | CTCTL_CAP_CSUM_L4)
#define CTCTL_FP_IFINDEX(_i) (((__u64)(_i) & 0xffffff) << 8)

static __always_inline int walk_cacheable(const struct ctctl_state *st, __u32 caps)
{
	return (caps & CTCTL_CAP_FLOW_CACHE) && !(caps & CTCTL_CACHE_CAPS) &&
	       st->ct_lookups == 1 && st->tuple.zone == 0 && st->fp_verdict != CTCTL_FP_NONE &&
	       !(st->done & (CTCTL_DONE_PEDIT | CTCTL_DONE_DECAP));
}

/*
 * What a flow's entry keeps of the packets it finished: the rules they ran
 * (its owners, slide 19) and, when the walk can be replayed, its verdict.
 * Written only when that differs from what the entry held at the hit (the
 * packet's copy), so a flow in its steady state costs compares; and only
 * into the entry that was hit, not into one the driver put in its place
 * since (another connection, a new mark).  Built without it
 * (-DCTCTL_NO_PATH) only to measure that cost.
 */
static __always_inline void record_flow(ctctl_ctx *ctx, struct ctctl_state *st, __u32 caps)
{
	const __u64 *now = (const __u64 *)st->path, *had = (const __u64 *)st->ct_flow.path;
	const __u64 *meta = (const __u64 *)&st->ct_flow.conn_id, *cur;
	__u64 tag = 0, verdict = 0;
	struct ctctl_flow *f;

	if (walk_cacheable(st, caps)) {
		tag = (__u64)st->gen << 32 | ctx_ifindex(ctx);
		verdict = (__u64)st->fp_arg << 32 | CTCTL_FP_IFINDEX(ctx_ifindex(ctx)) | st->fp_verdict;
		if (st->done & (CTCTL_DONE_SNAT | CTCTL_DONE_DNAT))
			verdict |= CTCTL_FP_NAT;
	}
	if (((now[0] ^ had[0]) | (now[1] ^ had[1]) | (now[2] ^ had[2]) |
	     (tag ^ st->ct_flow.fp_tag) | (verdict ^ st->ct_flow.fp_verdict)) == 0)
		return;
	f = flow_lookup(&st->tuple);
	if (!f)
		return;
	/* conn_id to nat_dst: eight words, as the hit copied them. */
	cur = (const __u64 *)&f->conn_id;
#pragma unroll
	for (int i = 0; i < 8; i++)
		if (cur[i] != meta[i])
			return;
	__builtin_memcpy(f->path, st->path, sizeof(f->path));
	/* Verdict before tag: a reader that sees the new tag sees its verdict. */
	f->fp_verdict = verdict;
	asm volatile("" ::: "memory");
	f->fp_tag = tag;
}

/*
 * A packet of a cached flow: what its walk would do, from the entry.  The
 * counters move as the walk moves them (the ct hit, the entry's counters
 * and last use, NAT, each rule of its path, the verdict's); CTCTL_PUNT
 * when the packet must walk.  The key is built in the scratch state, not
 * on the stack: with a stack key here the verifier went through the whole
 * interpreter three times (815,000 instructions against 243,000, when
 * measured).
 */
static __always_inline int cached_verdict(ctctl_ctx *ctx, const struct ctctl_pkt *p,
					  __u32 caps, __u32 gen, struct ctctl_state *st)
{
	struct ctctl_tuple *tp = &st->tuple;
	struct ctctl_flow *f;
	__u64 tag, verdict;

	if (p->l4_kind != CTCTL_L4_PORTS && p->l4_kind != CTCTL_L4_ECHO)
		return CTCTL_PUNT;
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (CTCTL_TCP_SYN | CTCTL_TCP_FIN | CTCTL_TCP_RST)))
		return CTCTL_PUNT;
	__builtin_memcpy(tp->src, p->src, 16);
	__builtin_memcpy(tp->dst, p->dst, 16);
	tp->sport = p->sport;
	tp->dport = p->dport;
	tp->l3 = p->ip_version;
	tp->proto = p->proto;
	tp->zone = 0;
	f = flow_lookup(tp);
	if (!f) {
		count(CTCTL_C_CACHE_MISS, 1);
		return CTCTL_PUNT;
	}
	tag = f->fp_tag;
	verdict = f->fp_verdict;
	if (tag != ((__u64)gen << 32 | ctx_ifindex(ctx)) ||
	    (verdict & CTCTL_FP_IFINDEX(0xffffff)) != CTCTL_FP_IFINDEX(ctx_ifindex(ctx))) {
		count(tag && (__u32)tag == ctx_ifindex(ctx) ? CTCTL_C_CACHE_STALE : CTCTL_C_CACHE_MISS, 1);
		return CTCTL_PUNT;
	}
	count(CTCTL_C_CACHE_HIT, 1);
	count(CTCTL_C_CT_HIT, 1);
	if (caps & CTCTL_CAP_FLOW_COUNTERS) {
		__sync_fetch_and_add(&f->packets, 1);
		__sync_fetch_and_add(&f->bytes, p->l3_len);
	}
	if (caps & (CTCTL_CAP_FLOW_COUNTERS | CTCTL_CAP_HW_AGING))
		f->last_used_ns = last_use();
	if (verdict & CTCTL_FP_NAT) {
		/* The rewrite needs the parsed packet where bpf/nat.h reads it. */
		state_reset(st);
		state_load(st, p);
		if (nat_apply(ctx, st, f) < 0) {
			count(CTCTL_C_DROP, 1);
			return CTCTL_SHOT;
		}
		count(CTCTL_C_NAT, 1);
	}
	/* The rule of each chain the walk went through (the path the same
	 * walk wrote: rule ids are never 0 on a walk that finished). */
#pragma unroll
	for (int hop = 0; hop <= CTCTL_MAX_HOPS; hop++) {
		struct ctctl_rule_stats *s;

		if (!f->path[hop])
			break;
		s = rule_stats_lookup(f->path[hop]);
		if (s) {
			s->packets++;	/* per-CPU slot */
			s->bytes += ctx_len(ctx);
		}
	}
	switch (verdict & CTCTL_FP_KIND) {
	case CTCTL_FP_REDIRECT:
		count(CTCTL_C_REDIRECT, 1);
		/* The walk that cached it redirected to this port: it is one. */
		return port_redirect(verdict >> 32);
	case CTCTL_FP_DROP:
		count(CTCTL_C_DROP, 1);
		return CTCTL_SHOT;
	default:
		count(CTCTL_C_PASS, 1);
		return CTCTL_OK;
	}
}

/* The program decapsulated the packet (st is valid only then: with tunnels). */
static __always_inline int decapsulated(const struct ctctl_state *st, __u32 caps)
{
	return (caps & CTCTL_CAP_TUNNELS) && (st->done & CTCTL_DONE_DECAP);
}

int ctctl_ingress(ctctl_ctx *ctx)
{
	struct ctctl_pkt pkt = {};
	struct ctctl_hw_config *cfg;
	struct ctctl_state *st;
	struct cursor c;
	__u32 zero = 0, caps = 0, gen = 0, pull;
	int r;

	/*
	 * Keep the parsed packet in memory: left to itself the compiler
	 * splits it into some twenty scalars and copies all of them at every
	 * branch of the parser, which cost a hit ~60 ns (a third of it) and
	 * the verifier 50,000 instructions.
	 */
	asm volatile("" : : "r"(&pkt) : "memory");
	count(CTCTL_C_RX, 1);
	count(CTCTL_C_RX_BYTES, ctx_len(ctx));

	/* The generation first: a verdict this packet caches is from rules
	 * and caps at least as old as it. */
	cfg = hw_config_lookup();
	if (cfg) {
		caps = cfg->caps;
		gen = cfg->gen;
	}
	st = scratch.lookup(&zero);
	if (!st)
		return CTCTL_SHOT;	/* cannot happen: index 0 of a 1-slot array */
#ifndef CTCTL_NO_TUNNEL
	/* A tunnel's frame: decapsulated once, here, before it is parsed. */
	if (caps & CTCTL_CAP_TUNNELS) {
		state_reset(st);
		st->gen = gen;
		st->in_ifindex = ctx_ifindex(ctx);
		r = tunnel_decap(ctx, st);
		if (r == CTCTL_DECAP_FAILED) {
			count(CTCTL_C_DROP, 1);
			return CTCTL_SHOT;
		}
		if (r > CTCTL_DECAP_DONE) {
			st->tun.flags = 0;	/* the frame goes whole: software decapsulates */
			st->reason = r;
			return punt(ctx, st);
		}
	}
#endif

	pull = ctx_len(ctx) < CTCTL_PULL_LEN ? ctx_len(ctx) : CTCTL_PULL_LEN;
	ctx_pull(ctx, pull);
	c.start = ctx_data(ctx);
	c.pos = c.start;
	c.end = ctx_data_end(ctx);
	c.len = ctx_len(ctx);
	c.l3_end = ctx_len(ctx);
	r = parse_packet(&c, &pkt);
#ifdef CTCTL_XDP
	/* A checksum left partial, completed before anything reads or
	 * rewrites the packet, the flow cache included (bpf/hook.h). */
	if (r == CTCTL_R_NONE && (pkt.proto == IPPROTO_TCP || pkt.proto == IPPROTO_UDP)) {
		int done = csum_complete_partial(ctx, &pkt, st);

		if (done > 0)
			count(CTCTL_C_CSUM_COMPLETED, 1);
		if (done < 0) {
			count(CTCTL_C_DROP, 1);
			return CTCTL_SHOT;
		}
	}
#endif

	if (!decapsulated(st, caps)) {
		if (r == CTCTL_R_NONE && (caps & CTCTL_CAP_FLOW_CACHE) && !(caps & CTCTL_CACHE_CAPS)) {
			int v = cached_verdict(ctx, &pkt, caps, gen, st);

			if (v != CTCTL_PUNT)
				return v;
		}
		/* With tunnels the state was reset before the decap, and a
		 * cache lookup that punts leaves it so. */
		if (!(caps & CTCTL_CAP_TUNNELS)) {
			state_reset(st);
			st->gen = gen;
			st->in_ifindex = ctx_ifindex(ctx);
		}
	}
	if (r != CTCTL_R_NONE) {
		st->reason = r;
		return punt(ctx, st);
	}
	state_load(st, &pkt);
	/*
	 * Checksums the hardware verifies: here, once per packet, although
	 * only a ct action acts on the result (as conntrack's error check):
	 * a loop inside the interpreter's loops would be verified once per
	 * hop and action, far beyond the verifier's budget.
	 */
	if ((caps & (CTCTL_CAP_CSUM_IPV4 | CTCTL_CAP_CSUM_L4)) && !csum_ok(ctx, st, caps))
		st->csum_bad = 1;
	/* The same for a TCP segment's SACK blocks, which window tracking reads. */
	if ((caps & CTCTL_CAP_TCP_WINDOW) && pkt.proto == IPPROTO_TCP)
		tcp_sack_scan(ctx, st);
	r = interpret(ctx, st);
#ifndef CTCTL_NO_TUNNEL
	if (r == CTCTL_ENCAP)
		r = tunnel_encap(ctx, st);
#endif
	if (r == CTCTL_PUNT)
		return punt(ctx, st);
#ifndef CTCTL_NO_PATH
	if (st->ct_hit)
		record_flow(ctx, st, caps);
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

#ifdef CTCTL_XDP
/*
 * On the peer of each port (ctctl/nic/wire.py): veth hands a frame
 * redirected at XDP only to a peer that runs NAPI, which it does while
 * an XDP program is attached there.  This one passes everything up.
 */
int ctctl_peer_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
#endif
