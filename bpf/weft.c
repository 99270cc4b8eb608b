/* weft's data path: outbound capture, inbound enforcement, the same-node fast path and
 * flow telemetry, for the pods of one node.
 *
 * Compiled by bcc when the agent starts (agent/datapath/compiler.py) with -D flags from
 * lib/config.h; loaded, pinned and attached by agent/datapath/loader.py. Print the C the
 * agent compiles with `weft agent bpf dump`. docs/datapath.md describes every hook and map.
 *
 *   weft_connect4 / weft_connect6  cgroup/connect4, connect6 on each meshed pod's cgroup
 *   weft_sockops                   sockops on each meshed pod's cgroup
 *   weft_fastpath_msg              sk_msg verdict on weft_fastpath_socks_v1
 *   weft_inbound                   cgroup_skb/ingress on each meshed pod's cgroup
 *   weft_tunnel_egress             cgroup_skb/egress on the node tunnel's cgroup
 *   weft_original_dst              cgroup/getsockopt on the tunnel's cgroup (SO_ORIGINAL_DST)
 *
 * Minimum kernel: 5.10 (bpf_sk_fullsock in cgroup_skb, RTT callbacks, sk_msg size).
 * Overhead: one hash lookup per connect for unmeshed traffic; a few lookups per connect,
 * per TCP state change and per ACK (rate-limited writes) for meshed pods; one lookup and
 * one redirect per send on spliced sockets; inbound runs per packet of a STRICT pod but
 * reads the IP header only for packets addressed to a listening socket.
 */
#include "lib/config.h"
#include "lib/common.h"
#include "lib/counters.h"
#include "lib/maps.h"
#include "lib/drop.h"
#include "lib/pod.h"
#include "lib/exclude.h"
#include "lib/policy.h"
#include "lib/origdst.h"
#include "lib/flow.h"

#define WEFT_SYS_PROCEED 1 /* cgroup sock_addr and skb programs: let it through */
#define WEFT_SYS_REJECT 0

/* Decide one TCP connect of a meshed pod: 1 and *to filled to redirect, 0 to leave it. */
static __always_inline int weft_capture(struct bpf_sock_addr *ctx, __be32 dst, __u16 port,
					struct weft_endpoint *to)
{
	__u64 cgroup_id = bpf_get_current_cgroup_id(); /* connect runs in the caller's context */
	struct weft_pod_config *pod = weft_pod_by_cgroup(cgroup_id);
	struct weft_node_config *node = weft_node();

	if (!pod || !(pod->flags & WEFT_POD_CAPTURE))
		return 0;
	if (!node || !node->tunnel_ip)
		return -ENOENT; /* agent not configured yet: nothing to redirect to */
	weft_count(WEFT_CTR_CONNECTS, 1);
	if (weft_outbound_excluded(ctx, node, pod, cgroup_id, dst, port)) {
		weft_count(WEFT_CTR_EXCLUDED, 1);
		return 0;
	}
	if (weft_fastpath_allowed(node, pod->ip, dst, port)) {
		weft_count(WEFT_CTR_FASTPATH_CONNECTS, 1);
		return 0;
	}
	/* Without a record the tunnel could not serve the connection: leave it alone. */
	if (weft_origdst_remember(bpf_get_socket_cookie(ctx), dst, port, cgroup_id) < 0)
		return -ENOMEM;
	to->ip = node->tunnel_ip;
	to->port = node->outbound_port;
	weft_count(WEFT_CTR_REDIRECTED, 1);
	return 1;
}

int weft_connect4(struct bpf_sock_addr *ctx)
{
	struct weft_endpoint to = {};

	if (ctx->protocol != IPPROTO_TCP)
		return WEFT_SYS_PROCEED;
	if (weft_capture(ctx, ctx->user_ip4, bpf_ntohs((__u16)ctx->user_port), &to) > 0) {
		ctx->user_ip4 = to.ip;
		ctx->user_port = bpf_htons(to.port);
	}
	return WEFT_SYS_PROCEED;
}

/* IPv6 sockets: IPv4-mapped destinations (::ffff:a.b.c.d) are captured like connect4;
 * native IPv6 passes uncaptured and is counted (the lab and the tunnel are IPv4 only). */
int weft_connect6(struct bpf_sock_addr *ctx)
{
	struct weft_endpoint to = {};

	if (ctx->protocol != IPPROTO_TCP)
		return WEFT_SYS_PROCEED;
	if (ctx->user_ip6[0] || ctx->user_ip6[1] || ctx->user_ip6[2] != bpf_htonl(0x0000ffff)) {
		if (weft_pod_by_cgroup(bpf_get_current_cgroup_id()))
			weft_count(WEFT_CTR_IPV6_PASSED, 1);
		return WEFT_SYS_PROCEED;
	}
	if (weft_capture(ctx, ctx->user_ip6[3], bpf_ntohs((__u16)ctx->user_port), &to) > 0) {
		ctx->user_ip6[3] = to.ip;
		ctx->user_port = bpf_htons(to.port);
	}
	return WEFT_SYS_PROCEED;
}

/* A connection of a meshed pod is established: re-key its original destination, join the
 * fast path when the pair is allowed, open its flow record, ask for state/RTT callbacks. */
static __always_inline void weft_established(struct bpf_sock_ops *skops, __u8 direction)
{
	struct weft_origdst orig = {};
	struct weft_node_config *node;
	struct weft_sock_key key;
	__u64 cgroup_id = 0, cookie;
	__u8 flags = 0;
	int allowed;

	if (weft_sock_key_of(skops, &key) < 0)
		return;
	/* By address, not bpf_get_current_cgroup_id(): PASSIVE_ESTABLISHED runs in softirq. */
	if (!weft_pod_by_ip(key.local_ip, &cgroup_id))
		return;
	node = weft_node();
	if (!node)
		return;
	cookie = bpf_get_socket_cookie(skops);
	if (direction == WEFT_FLOW_OUTBOUND && weft_origdst_rekey(cookie, &key, &orig) == 0)
		flags |= WEFT_FLOW_REDIRECTED;
	if (direction == WEFT_FLOW_OUTBOUND)
		allowed = weft_fastpath_allowed(node, key.local_ip, key.remote_ip, key.remote_port);
	else
		allowed = weft_fastpath_allowed(node, key.remote_ip, key.local_ip, key.local_port);
	if (allowed && weft_fastpath_join(skops, &key, cookie) == 0)
		flags |= WEFT_FLOW_FASTPATH;
	weft_flow_open(skops, &key, cookie, cgroup_id, direction, &orig, flags);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG |
						 BPF_SOCK_OPS_RTT_CB_FLAG |
						 BPF_SOCK_OPS_RETRANS_CB_FLAG);
}

int weft_sockops(struct bpf_sock_ops *skops)
{
	__u64 cookie;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* A redirected connect that never establishes (refused while no agent listens,
		 * timed out) would keep its original destination keyed by cookie for good: ask
		 * for the state callback, which removes it when the socket closes. */
		cookie = bpf_get_socket_cookie(skops);
		if (weft_origdst_cookie_v1.lookup(&cookie))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		weft_established(skops, WEFT_FLOW_OUTBOUND);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		weft_established(skops, WEFT_FLOW_INBOUND);
		break;
	case BPF_SOCK_OPS_RTT_CB:
	case BPF_SOCK_OPS_RETRANS_CB:
		weft_flow_sample(skops, 0);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE) {
			weft_flow_close(skops);
			/* Established connections were re-keyed (and this entry deleted) already;
			 * one still here belongs to a connect that failed. */
			cookie = bpf_get_socket_cookie(skops);
			weft_origdst_cookie_v1.delete(&cookie);
		}
		break;
	default:
		break;
	}
	return 1;
}

static __always_inline int weft_msg_key(struct sk_msg_md *msg, struct weft_sock_key *key)
{
	__u32 remote_port = msg->remote_port;

	if (msg->family == AF_INET6) {
		if (msg->remote_ip6[0] || msg->remote_ip6[1] ||
		    msg->remote_ip6[2] != bpf_htonl(0x0000ffff))
			return -EAFNOSUPPORT;
	} else if (msg->family != AF_INET) {
		return -EAFNOSUPPORT;
	}
	key->local_ip = msg->local_ip4;
	key->remote_ip = msg->remote_ip4;
	key->local_port = (__u16)msg->local_port;
	key->remote_port = remote_port > 0xffff ? (__u16)bpf_ntohl(remote_port)
						: bpf_ntohs((__u16)remote_port);
	return 0;
}

/* Each send on a spliced socket goes straight into the peer socket's receive queue. If the
 * peer is not in the sockhash yet (its ACK is still in flight) the socket stays on TCP for
 * good: mixing the two paths could reorder bytes. */
int weft_fastpath_msg(struct sk_msg_md *msg)
{
	struct weft_sock_key own, peer;
	struct weft_fastpath_sock *state;
	long verdict;

	if (weft_msg_key(msg, &own) < 0)
		return SK_PASS;
	state = weft_fastpath_state_v1.lookup(&own);
	if (!state || (state->flags & WEFT_FASTPATH_TCP_ONLY))
		return SK_PASS;
	peer.local_ip = own.remote_ip;
	peer.remote_ip = own.local_ip;
	peer.local_port = own.remote_port;
	peer.remote_port = own.local_port;
	verdict = weft_fastpath_socks_v1.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict != SK_PASS) {
		state->flags |= WEFT_FASTPATH_TCP_ONLY;
		weft_count(WEFT_CTR_FASTPATH_FALLBACK, 1);
		return SK_PASS;
	}
	__sync_fetch_and_add(&state->bytes, msg->size);
	__sync_fetch_and_add(&state->msgs, 1);
	weft_count(WEFT_CTR_FASTPATH_MSGS, 1);
	weft_count(WEFT_CTR_FASTPATH_BYTES, msg->size);
	return SK_PASS;
}

/* A TCP packet between the node's address and a pod, keyed as the pod sees it (local =
 * the pod, the destination): the same key for the tunnel's SYN leaving (egress on the
 * tunnel's cgroup) and arriving (ingress on the pod's). -1 if not TCP or unreadable. */
static __always_inline int weft_tcp_key(struct __sk_buff *skb, struct iphdr *ip,
					struct weft_sock_key *key, __u8 *flags)
{
	struct tcphdr tcp;
	__u32 off = (__u32)ip->ihl * 4;

	if (ip->protocol != IPPROTO_TCP || off < sizeof(*ip) || off > 60)
		return -1;
	if (bpf_skb_load_bytes(skb, off, &tcp, sizeof(tcp)) < 0)
		return -1;
	key->local_ip = ip->daddr;
	key->remote_ip = ip->saddr;
	key->local_port = bpf_ntohs(tcp.dest);
	key->remote_port = bpf_ntohs(tcp.source);
	*flags = ((__u8 *)&tcp)[13]; /* CWR ECE URG ACK PSH RST SYN FIN */
	return 0;
}

#define WEFT_TCP_SYN 0x02
#define WEFT_TCP_ACK 0x10

/* Whether a packet from the node's address to a STRICT pod's listener belongs to a
 * connection the node tunnel itself opened (weft_tunnel_egress recorded its SYN). */
static __always_inline int weft_from_tunnel_socket(struct __sk_buff *skb, struct iphdr *ip)
{
	struct weft_sock_key key = {};
	__u8 flags = 0;

	if (weft_tcp_key(skb, ip, &key, &flags) < 0)
		return 0;
	return weft_tunnel_syns_v1.lookup(&key) != NULL;
}

/* cgroup_skb/egress on the node tunnel's own cgroup: remember each connection it opens to a
 * local pod (its SYN), so the pod's STRICT check can tell the tunnel from other processes
 * that send from the node's address. Never drops. */
int weft_tunnel_egress(struct __sk_buff *skb)
{
	struct weft_sock_key key = {};
	__u64 cgroup_id = 0;
	struct iphdr ip;
	__u8 flags = 0, one = 1;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return WEFT_SYS_PROCEED;
	if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
		return WEFT_SYS_PROCEED;
	if (weft_tcp_key(skb, &ip, &key, &flags) < 0)
		return WEFT_SYS_PROCEED;
	if ((flags & (WEFT_TCP_SYN | WEFT_TCP_ACK)) != WEFT_TCP_SYN)
		return WEFT_SYS_PROCEED;
	if (!weft_pod_by_ip(ip.daddr, &cgroup_id))
		return WEFT_SYS_PROCEED;
	weft_tunnel_syns_v1.update(&key, &one);
	return WEFT_SYS_PROCEED;
}

/* STRICT: TCP reaching a listening socket of the pod must come from the node tunnel, the
 * pod itself, an inbound exception port, the node itself on a probe port (the kubelet), or
 * an allowed fast-path peer. Packets of
 * established connections pass: those exist only if their SYN passed here or the pod
 * opened them. Returns 0 to pass, -EPERM (counted) to drop. */
/* Where a resolver that does not connect its socket receives DNS answers: an ephemeral
 * port (Linux's default ip_local_port_range starts here). A server's port is below it, so
 * "from port 53" does not open servers to anyone who sends from port 53. */
#define WEFT_EPHEMERAL_MIN 32768
#define WEFT_SOCK_RAW 3 /* linux/net.h */

static __always_inline int weft_dns_answer(__be16 sport, struct bpf_sock *sk)
{
	return sport == bpf_htons(53) && sk->src_port >= WEFT_EPHEMERAL_MIN;
}

/* A protocol weft neither meshes nor reads ports of (SCTP, ...): on a STRICT pod, dropped
 * unless from the pod itself, loopback or to an exception port (weft_inbound_other). ICMP
 * passes (replies to the pod's own pings); IPPROTO_RAW sockets only send. Raw sockets
 * bound to TCP or UDP are judged by weft_inbound_other too (weft_inbound_check). */
static __always_inline int weft_other_protocol(__u8 protocol)
{
	return protocol != IPPROTO_TCP && protocol != IPPROTO_UDP &&
	       protocol != IPPROTO_UDPLITE && protocol != IPPROTO_ICMP &&
	       protocol != IPPROTO_ICMPV6 && protocol != IPPROTO_RAW;
}

/* UDP (and UDP-Lite) to a STRICT pod over IPv4: not meshed, so an unconnected socket (a
 * UDP server) admits only the pod itself, loopback, DNS answers to an ephemeral port (for
 * resolvers that do not connect their socket) and inbound exception ports. Connected
 * sockets only ever receive from their peer: replies to flows the pod opened, which pass. */
static __always_inline int weft_inbound_udp(struct __sk_buff *skb, __u64 cgroup_id,
					    struct weft_pod_config *pod, struct bpf_sock *sk)
{
	struct iphdr ip;
	__be16 sport;

	if (sk->dst_port)
		return 0;
	if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
		return weft_drop(cgroup_id, WEFT_DROP_MALFORMED);
	if (ip.saddr == pod->ip || weft_is_loopback(ip.saddr))
		return 0;
	if (ip.ihl < 5 || bpf_skb_load_bytes(skb, ip.ihl * 4, &sport, sizeof(sport)) < 0)
		return weft_drop(cgroup_id, WEFT_DROP_MALFORMED);
	if (weft_dns_answer(sport, sk))
		return 0;
	if (weft_port_listed(cgroup_id, sk->src_port, WEFT_PORT_INBOUND_EXCEPTION))
		return 0;
	return weft_drop(cgroup_id, WEFT_DROP_UDP_NOT_MESHED);
}

/* Native IPv6 to a STRICT pod: weft meshes IPv4 only, so IPv6 is dropped wherever it could
 * open something (a TCP listener, an unconnected UDP socket, a raw socket, another
 * protocol), except from the pod's own network namespace (it arrives over loopback), on an
 * inbound exception port (probe ports are an IPv4 exemption), and DNS answers as for IPv4.
 * Sockets the pod connected only receive from their peer, as for IPv4, and pass. */
#define WEFT_LOOPBACK_IFINDEX 1 /* lo is the first device of every network namespace */
static __always_inline int weft_inbound_ipv6(struct __sk_buff *skb, __u64 cgroup_id,
					     struct bpf_sock *sk)
{
	struct ipv6hdr ip6;
	__be16 sport;

	if (sk->type == WEFT_SOCK_RAW) {
		if (sk->protocol == IPPROTO_ICMPV6)
			return 0;
	} else if (sk->protocol == IPPROTO_TCP) {
		if (sk->state != BPF_TCP_LISTEN)
			return 0;
	} else if (sk->protocol == IPPROTO_UDP || sk->protocol == IPPROTO_UDPLITE) {
		if (sk->dst_port)
			return 0;
	} else if (!weft_other_protocol(sk->protocol)) {
		return 0;
	}
	if (skb->ingress_ifindex == WEFT_LOOPBACK_IFINDEX)
		return 0;
	if (weft_port_listed(cgroup_id, sk->src_port, WEFT_PORT_INBOUND_EXCEPTION))
		return 0;
	if (sk->protocol == IPPROTO_UDP) {
		/* Only a UDP header right after the fixed header is read: a datagram behind
		 * extension headers gets no DNS exception (dropped, never misread). */
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
			return weft_drop(cgroup_id, WEFT_DROP_MALFORMED);
		if (ip6.nexthdr == IPPROTO_UDP &&
		    bpf_skb_load_bytes(skb, sizeof(ip6), &sport, sizeof(sport)) == 0 &&
		    weft_dns_answer(sport, sk))
			return 0;
	}
	return weft_drop(cgroup_id, WEFT_DROP_IPV6_NOT_MESHED);
}

static __always_inline int weft_inbound_other(struct __sk_buff *skb, __u64 cgroup_id,
					      struct weft_pod_config *pod, struct bpf_sock *sk)
{
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
		return weft_drop(cgroup_id, WEFT_DROP_MALFORMED);
	if (ip.saddr == pod->ip || weft_is_loopback(ip.saddr))
		return 0;
	if (weft_port_listed(cgroup_id, sk->src_port, WEFT_PORT_INBOUND_EXCEPTION))
		return 0;
	return weft_drop(cgroup_id, WEFT_DROP_PROTOCOL_NOT_MESHED);
}

static __always_inline int weft_inbound_check(struct __sk_buff *skb)
{
	struct weft_node_config *node;
	struct weft_pod_config *pod;
	struct bpf_sock *sk;
	struct iphdr ip;
	__u64 cgroup_id;

	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
		return 0;
	cgroup_id = bpf_skb_cgroup_id(skb);
	pod = weft_pod_by_cgroup(cgroup_id);
	if (!pod || !(pod->flags & WEFT_POD_STRICT))
		return 0;
	sk = skb->sk;
	if (!sk)
		return 0;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 0;
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return weft_inbound_ipv6(skb, cgroup_id, sk);
	/* A raw socket bound to TCP or UDP sees every segment of that protocol, the ones
	 * STRICT drops for the pod's real sockets included: the same rule as other protocols
	 * (the pod itself, loopback, exception ports). */
	if (weft_other_protocol(sk->protocol) ||
	    (sk->type == WEFT_SOCK_RAW && sk->protocol != IPPROTO_ICMP))
		return weft_inbound_other(skb, cgroup_id, pod, sk);
	if (sk->protocol == IPPROTO_UDP || sk->protocol == IPPROTO_UDPLITE)
		return weft_inbound_udp(skb, cgroup_id, pod, sk);
	if (sk->protocol != IPPROTO_TCP || sk->state != BPF_TCP_LISTEN)
		return 0;
	node = weft_node();
	if (!node || !node->tunnel_ip)
		return weft_drop(cgroup_id, WEFT_DROP_NODE_UNCONFIGURED);
	if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
		return weft_drop(cgroup_id, WEFT_DROP_MALFORMED);
	if (ip.saddr == node->tunnel_ip) {
		if (weft_from_tunnel_socket(skb, &ip))
			return 0;
		/* The kubelet probes from the node's address: on a probe port, a process of
		 * the node's own network namespace is admitted; anyone else is not. */
		if (weft_port_listed(cgroup_id, sk->src_port, WEFT_PORT_PROBE))
			return 0;
		return weft_drop(cgroup_id, WEFT_DROP_NOT_TUNNEL_SOCKET);
	}
	if (ip.saddr == pod->ip || weft_is_loopback(ip.saddr))
		return 0;
	if (weft_port_listed(cgroup_id, sk->src_port, WEFT_PORT_INBOUND_EXCEPTION))
		return 0;
	if (weft_fastpath_allowed(node, ip.saddr, ip.daddr, sk->src_port))
		return 0;
	return weft_drop(cgroup_id, WEFT_DROP_NOT_FROM_TUNNEL);
}

int weft_inbound(struct __sk_buff *skb)
{
	return weft_inbound_check(skb) < 0 ? WEFT_SYS_REJECT : WEFT_SYS_PROCEED;
}

/* sk_lookup on the node's network namespace: a connection to the tunnel's outbound address
 * (where capture sends pods' connects) goes to the agent's own listener, registered in
 * weft_tunnel_listeners_v1, or nowhere: another process that binds that port while no agent
 * listens (a crash, an upgrade) never receives a pod's plaintext, and the connect's SYN
 * is dropped, so the client retries it until the next agent registers its listener (a
 * reuseport group: a successor sharing the port is selected too). */
int weft_tunnel_lookup(struct bpf_sk_lookup *ctx)
{
	struct weft_node_config *node = weft_node();
	struct bpf_sock *sk;
	__u32 key = 0;
	long err;

	if (!node || !node->tunnel_ip || ctx->protocol != IPPROTO_TCP || ctx->family != AF_INET)
		return SK_PASS;
	if (ctx->local_ip4 != node->tunnel_ip || ctx->local_port != node->outbound_port)
		return SK_PASS;
	sk = (struct bpf_sock *)weft_tunnel_listeners_v1.lookup(&key);
	if (!sk)
		return SK_DROP;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

#define WEFT_SOL_IP 0
#define WEFT_SO_ORIGINAL_DST 80 /* linux/netfilter_ipv4.h */

/* getsockopt(SOL_IP, SO_ORIGINAL_DST) on a socket the tunnel accepted answers with the
 * pod's original destination, as iptables REDIRECT would: proxies that already speak
 * SO_ORIGINAL_DST need no weft-specific lookup. Other options pass untouched. The entry is
 * left in place (the Python API deletes on read; LRU bounds what nobody reads). */
int weft_original_dst(struct bpf_sockopt *ctx)
{
	struct sockaddr_in *sin = ctx->optval;
	struct weft_origdst *orig;
	struct bpf_sock *sk = ctx->sk;

	if (ctx->level != WEFT_SOL_IP || ctx->optname != WEFT_SO_ORIGINAL_DST)
		return 1;
	if (!sk || sk->family != AF_INET)
		return 1;
	orig = weft_origdst_of_peer(sk->dst_ip4, bpf_ntohs(sk->dst_port));
	if (!orig)
		return 1;
	if ((void *)(sin + 1) > ctx->optval_end)
		return 1;
	sin->sin_family = AF_INET;
	sin->sin_port = bpf_htons(orig->port);
	sin->sin_addr.s_addr = orig->ip;
	ctx->optlen = sizeof(*sin);
	/* Keep clang from merging the two 4-byte context stores into one 8-byte store,
	 * which the verifier rejects. */
	asm volatile("" ::: "memory");
	ctx->retval = 0;
	return 1;
}
