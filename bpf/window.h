/* SPDX-License-Identifier: GPL-2.0 */
/*
 * TCP window tracking in the "NIC" (slide 22: "TCP window validation ...
 * used for -inv/+inv"): nf_conntrack's tcp_in_window, for the segments a
 * ct action answers from the offload table.  The software reference is
 * ctctl/kernel/conntrack/tcp.py in_window; this is the part of it that an
 * ESTABLISHED connection's segments without SYN, FIN or RST can reach
 * (those three are software's: bpf/rules.h punts them before this runs).
 *
 * Contract: tcp_window() judges the segment in st against the context of
 * the entry's connection and returns
 *   CTCTL_WIN_OK       in window: the context is updated, as the kernel's;
 *   CTCTL_WIN_IGNORE   the kernel would let it through without updating the
 *                      connection (no refresh, no accounting);
 *   CTCTL_WIN_INVALID  the kernel would call it invalid (+inv);
 *   CTCTL_WIN_PUNT     this hardware cannot judge it (no context, a state
 *                      other than ESTABLISHED): software's, with the
 *                      context as it is.
 *
 * Concurrency: both directions of a connection live in one context with one
 * bpf_spin_lock, taken around the whole judgement; two CPUs forwarding the
 * same connection (two RX queues, or both directions) serialise on it.
 * Nothing else runs under the lock: no helper, no map access.
 */
#ifndef CTCTL_WINDOW_H
#define CTCTL_WINDOW_H

#include "ctctl_abi.h"
#include "key.h"
#include "maps.h"

#define CTCTL_WIN_OK 0
#define CTCTL_WIN_IGNORE 1
#define CTCTL_WIN_INVALID 2
#define CTCTL_WIN_PUNT 3

#define CTCTL_TCPF_ACK 0x10

/* ip_ct_tcp_state.flags, as nf_conntrack numbers them. */
#define CTCTL_TF_SACK_PERM 0x02
#define CTCTL_TF_BE_LIBERAL 0x08
#define CTCTL_TF_DATA_UNACKNOWLEDGED 0x10
#define CTCTL_TF_MAXACK_SET 0x20

#define CTCTL_TCP_ESTABLISHED 3	/* TcpState.ESTABLISHED */
#define CTCTL_ACK_SET 3		/* the kernel's flag class index of a plain ACK */
#define CTCTL_MAXACKWINCONST 66000

/* The kernel's before()/after(): sequence numbers modulo 2^32. */
static __always_inline int seq_before(__u32 a, __u32 b)
{
	return (__s32)(a - b) < 0;
}

static __always_inline int seq_after(__u32 a, __u32 b)
{
	return seq_before(b, a);
}

/* A check failed: a liberal sender (or box) passes without an update. */
static __always_inline int window_fail(const struct ctctl_tcp_seen *sender, __u8 check, int verdict)
{
	return (sender->flags & CTCTL_TF_BE_LIBERAL) || check == CTCTL_WCHECK_LIBERAL ?
		CTCTL_WIN_OK : verdict;
}

/* The judgement proper, under the context's lock; dir is 0 or 1. */
static __always_inline int window_judge(struct ctctl_tcp_window *w, __u32 dir,
					__u32 seq, __u32 ack, __u32 end, __u16 win_raw, __u32 sack_edge)
{
	struct ctctl_tcp_seen *sender = &w->seen[dir];
	struct ctctl_tcp_seen *receiver = &w->seen[dir ^ 1];
	__u32 maxackwin, win, sack = ack;

	if (w->state != CTCTL_TCP_ESTABLISHED || sender->td_maxwin == 0)
		return CTCTL_WIN_PUNT;
	/* The SACK blocks' right edge counts when the receiver allowed SACK. */
	if (receiver->flags & CTCTL_TF_SACK_PERM)
		sack = sack_edge;
	w->segments++;

	maxackwin = sender->td_maxwin > CTCTL_MAXACKWINCONST ? sender->td_maxwin : CTCTL_MAXACKWINCONST;
	/* I: the segment starts inside what the receiver allowed. */
	if (!seq_before(seq, sender->td_maxend + 1)) {
		__u32 overshot = end - sender->td_maxend + 1;

		if (receiver->td_maxwin &&
		    seq_after(end, sender->td_end - receiver->td_maxwin - 1) &&
		    seq_after(sack, receiver->td_end - maxackwin - 1) &&
		    overshot <= receiver->td_maxwin && seq_before(sack, receiver->td_end + 1)) {
			/* More than the window: remembered, so its ACK passes later. */
			sender->td_end = end;
			sender->flags |= CTCTL_TF_DATA_UNACKNOWLEDGED;
			return window_fail(sender, w->check, CTCTL_WIN_IGNORE);
		}
		return window_fail(sender, w->check, CTCTL_WIN_INVALID);
	}
	/* II: it acknowledges nothing the receiver has not sent. */
	if (!seq_before(sack, receiver->td_end + 1))
		return window_fail(sender, w->check, CTCTL_WIN_INVALID);
	/* III: not data already acknowledged (a retransmission). */
	if (receiver->td_maxwin && !seq_after(end, sender->td_end - receiver->td_maxwin - 1))
		return window_fail(sender, w->check, CTCTL_WIN_IGNORE);
	/* IV: not an ACK from long ago. */
	if (!seq_after(sack, receiver->td_end - maxackwin - 1))
		return window_fail(sender, w->check, CTCTL_WIN_IGNORE);

	win = (__u32)win_raw << (sender->td_scale & 15);
	if (sender->td_maxwin < win + (sack - ack))
		sender->td_maxwin = win + (sack - ack);
	if (seq_after(end, sender->td_end)) {
		sender->td_end = end;
		sender->flags |= CTCTL_TF_DATA_UNACKNOWLEDGED;
	}
	if (!(sender->flags & CTCTL_TF_MAXACK_SET)) {
		sender->td_maxack = ack;
		sender->flags |= CTCTL_TF_MAXACK_SET;
	} else if (seq_after(ack, sender->td_maxack)) {
		sender->td_maxack = ack;
	}
	if (receiver->td_maxwin != 0 && seq_after(end, sender->td_maxend))
		receiver->td_maxwin += end - sender->td_maxend;
	if (seq_after(sack + win, receiver->td_maxend - 1)) {
		receiver->td_maxend = sack + win;
		if (win == 0)
			receiver->td_maxend++;
	}
	if (ack == receiver->td_end)
		receiver->flags &= ~CTCTL_TF_DATA_UNACKNOWLEDGED;

	/* tcp_packet's bookkeeping of an accepted ACK: retransmissions. */
	if (w->last_dir == dir && w->last_seq == seq && w->last_ack == ack &&
	    w->last_end == end && w->last_win == win_raw) {
		if (w->retrans < 255)
			w->retrans++;
	} else {
		w->last_dir = dir;
		w->last_seq = seq;
		w->last_ack = ack;
		w->last_end = end;
		w->last_win = win_raw;
		w->retrans = 0;
	}
	w->last_index = CTCTL_ACK_SET;
	return CTCTL_WIN_OK;
}

/*
 * tcp_sack(): the highest right edge of the segment's first well-formed
 * SACK option, into st->tcp_sack (st->tcp_has_sack set), as the kernel
 * reads it.  Run once per packet on entry (bpf/ctctl.c), outside the
 * interpreter's loops, over the options copied into the state's buffer;
 * each option's length goes through the map before it is used, as the
 * checksum's steps do (bpf/csum.h), so that the verifier's work does not
 * grow with every option.
 */
#define CTCTL_TCPOPT_MAX 40
#define CTCTL_TCPOPT_SACK 5

static __always_inline void tcp_sack_scan(ctctl_ctx *ctx, struct ctctl_state *st)
{
	const __u8 *opt = (const __u8 *)st->csum_buf;
	__u32 len = st->tcp_hlen - 20, k;

	st->tcp_has_sack = 0;
	if (st->tcp_opts != CTCTL_TCPOPT_OTHER || len > CTCTL_TCPOPT_MAX || len == 0)
		return;
	/* 1..40 as arithmetic, not a test: 6.1's verifier learns no lower
	 * bound from `len == 0`, and a helper's size must be at least 1. */
	len = ((len - 1) & 63) + 1;
	asm volatile("" : "+r"(len));
	if (ctx_load(ctx, st->l4_off + 20, st->csum_buf, len) < 0)
		return;
	st->csum_left = 0;	/* the option's offset, kept in the map between steps */
#pragma clang loop unroll(disable)
	for (k = 0; k < CTCTL_TCPOPT_MAX; k++) {
		__u32 i = *(volatile __u32 *)&st->csum_left, kind, size, b;

		if (i >= len)
			break;
		kind = opt[i & 63];
		if (kind == 0)
			break;
		size = 1;
		if (kind != 1) {
			if (i + 2 > len)
				break;
			size = opt[(i + 1) & 63];
			if (size < 2 || size > len - i)
				break;
		}
		if (kind == CTCTL_TCPOPT_SACK && size >= 10 && (size - 2) % 8 == 0) {
			__u32 best = st->tcp_ack;

#pragma unroll
			for (b = 0; b < 4; b++) {
				__u32 at = i + 2 + 8 * b + 4, edge;

				if (8 * b + 2 >= size)
					break;
				edge = (__u32)opt[at & 63] << 24 | (__u32)opt[(at + 1) & 63] << 16 |
				       (__u32)opt[(at + 2) & 63] << 8 | opt[(at + 3) & 63];
				if (seq_after(edge, best))
					best = edge;
			}
			st->tcp_sack = best;
			st->tcp_has_sack = 1;
			break;
		}
		st->csum_left = i + size;
	}
}

static __always_inline int tcp_window(struct ctctl_state *st, const struct ctctl_flow *f)
{
	struct ctctl_tcp_window *w;
	__u32 payload, end;
	int verdict;

	/* Neither SYN, FIN nor RST (punted before), and no ACK: no flag
	 * class at all, which tcp_error calls an invalid combination. */
	if (!(st->tcp_flags & CTCTL_TCPF_ACK))
		return CTCTL_WIN_INVALID;
	w = window_lookup(f->conn_id);
	if (!w)
		return CTCTL_WIN_PUNT;
	if (w->check == CTCTL_WCHECK_OFF)
		return CTCTL_WIN_OK;
	payload = st->l3_len - (st->l4_off - st->l3_off) - st->tcp_hlen;
	end = st->tcp_seq + payload;
	bpf_spin_lock(&w->lock);
	verdict = window_judge(w, f->dir & 1, st->tcp_seq, st->tcp_ack, end, st->tcp_win,
			       st->tcp_has_sack ? st->tcp_sack : st->tcp_ack);
	bpf_spin_unlock(&w->lock);
	return verdict;
}

/* One direction of a merge request (struct ctctl_window_merge), under the lock. */
static __always_inline void window_merge_seen(struct ctctl_tcp_seen *h, const struct ctctl_tcp_seen *s,
					      __u32 changed, __u8 set, __u8 clear)
{
	if ((changed & CTCTL_WM_END) && !seq_before(s->td_end, h->td_end))
		h->td_end = s->td_end;
	if ((changed & CTCTL_WM_MAXEND) && !seq_before(s->td_maxend, h->td_maxend))
		h->td_maxend = s->td_maxend;
	if ((changed & CTCTL_WM_MAXACK) && !seq_before(s->td_maxack, h->td_maxack))
		h->td_maxack = s->td_maxack;
	if ((changed & CTCTL_WM_MAXWIN) && s->td_maxwin > h->td_maxwin)
		h->td_maxwin = s->td_maxwin;
	if (changed & CTCTL_WM_SCALE)
		h->td_scale = s->td_scale;
	h->flags = (h->flags | set) & ~clear;
}

static __always_inline void window_merge(struct ctctl_tcp_window *w, const struct ctctl_window_merge *m)
{
	window_merge_seen(&w->seen[0], &m->seen[0], m->changed, m->set_flags[0], m->clear_flags[0]);
	window_merge_seen(&w->seen[1], &m->seen[1], m->changed >> CTCTL_WMERGE_DIR_SHIFT,
			  m->set_flags[1], m->clear_flags[1]);
	if (m->changed & CTCTL_WM_LAST) {
		w->last_dir = m->last_dir;
		w->last_index = m->last_index;
		w->last_seq = m->last_seq;
		w->last_ack = m->last_ack;
		w->last_end = m->last_end;
		w->last_win = m->last_win;
		w->retrans = m->retrans;
	}
}

#endif /* CTCTL_WINDOW_H */
