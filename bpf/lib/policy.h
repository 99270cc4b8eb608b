/* Same-node fast path: which socket pairs may be spliced, and joining the sockhash. */
#ifndef WEFT_POLICY_H
#define WEFT_POLICY_H

#include "drop.h"
#include "pod.h"

/* 1 when src may talk to dst:port without the tunnel: the node switch is on, both pods are
 * meshed on this node with the fast path on, and L4 policy allowed the pair (the agent
 * fills weft_fastpath_pairs_v1). Checked at connect, at both ends' establishment and by
 * STRICT, so turning a switch off takes effect for new connections at once. */
static __always_inline int weft_fastpath_allowed(const struct weft_node_config *node, __be32 src,
						 __be32 dst, __u16 dst_port)
{
	struct weft_pair_key pair = { .src_ip = src, .dst_ip = dst, .dst_port = dst_port };
	struct weft_pod_config *pod;
	__u64 cgroup_id;

	if (!(node->flags & WEFT_NODE_FASTPATH))
		return 0;
	pod = weft_pod_by_ip(src, &cgroup_id);
	if (!pod || !(pod->flags & WEFT_POD_FASTPATH))
		return 0;
	pod = weft_pod_by_ip(dst, &cgroup_id);
	if (!pod || !(pod->flags & WEFT_POD_FASTPATH))
		return 0;
	return weft_fastpath_pairs_v1.lookup(&pair) != 0;
}

/* Put an established socket into the sockhash under its own 4-tuple. */
static __always_inline int weft_fastpath_join(struct bpf_sock_ops *skops,
					      struct weft_sock_key *key, __u64 cookie)
{
	struct weft_fastpath_sock state = { .cookie = cookie };
	int err;

	weft_fastpath_state_v1.update(key, &state);
	/* bcc expands this method to a statement: it cannot sit inside an expression. */
	err = weft_fastpath_socks_v1.sock_hash_update(skops, key, BPF_ANY);
	if (err < 0) {
		weft_fastpath_state_v1.delete(key);
		weft_count(WEFT_CTR_FASTPATH_INSERT_ERRORS, 1);
		return -ENOSPC;
	}
	weft_count(WEFT_CTR_FASTPATH_SOCKETS, 1);
	return 0;
}

#endif /* WEFT_POLICY_H */
