"""The kernel's side of the proposal, in software: the tc datapath
(pipeline: flower + act_ct), netfilter's conntrack, and the flowtable that
offloads established connections to the "NIC" (offload/)."""
