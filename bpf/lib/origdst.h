/* Original destinations of redirected connects (the Merbridge pattern): connect4 keys them
 * by socket cookie; at ACTIVE_ESTABLISHED sockops re-keys them by the pod's (ip, port),
 * which is the peer address the tunnel sees when it accepts the connection. */
#ifndef WEFT_ORIGDST_H
#define WEFT_ORIGDST_H

#include "drop.h"

static __always_inline int weft_origdst_remember(__u64 cookie, __be32 ip, __u16 port,
						 __u64 cgroup_id)
{
	struct weft_origdst orig = { .ip = ip, .port = port, .cgroup_id = cgroup_id,
				     .cookie = cookie };

	return weft_origdst_cookie_v1.update(&cookie, &orig);
}

static __always_inline int weft_origdst_rekey(__u64 cookie, const struct weft_sock_key *key,
					      struct weft_origdst *out)
{
	struct weft_endpoint src = { .ip = key->local_ip, .port = key->local_port };
	struct weft_origdst *orig = weft_origdst_cookie_v1.lookup(&cookie);

	if (!orig)
		return -ENOENT;
	*out = *orig;
	weft_origdst_v1.update(&src, out);
	weft_origdst_cookie_v1.delete(&cookie);
	weft_count(WEFT_CTR_ORIGDST_REKEYED, 1);
	return 0;
}

/* The tunnel's view: the original destination of a connection it accepted from peer. */
static __always_inline struct weft_origdst *weft_origdst_of_peer(__be32 ip, __u16 port)
{
	struct weft_endpoint peer = { .ip = ip, .port = port };

	return weft_origdst_v1.lookup(&peer);
}

#endif /* WEFT_ORIGDST_H */
