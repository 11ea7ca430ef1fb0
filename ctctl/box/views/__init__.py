"""What a box's data looks like to a user: plain data in, text out (stats,
dump-flows, the offload listing, conntrack's formats)."""
