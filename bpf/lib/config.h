/* Compile-time settings. The agent passes each as a -D flag (agent/datapath/compiler.py,
 * from DatapathSettings); the defaults here only make the file compile on its own.
 * Map sizes bound kernel memory: every map below is fixed-size or LRU.
 */
#ifndef WEFT_CONFIG_H
#define WEFT_CONFIG_H

#ifndef WEFT_PODS_MAX
#define WEFT_PODS_MAX 1024 /* meshed pods on one node (kubelet's default max is 110) */
#endif /* WEFT_PODS_MAX */

#ifndef WEFT_PORTS_MAX
#define WEFT_PORTS_MAX 16384 /* per-pod port exceptions and exclusions, all pods together */
#endif /* WEFT_PORTS_MAX */

#ifndef WEFT_CIDRS_MAX
#define WEFT_CIDRS_MAX 4096 /* excluded outbound CIDRs, per pod and global together */
#endif /* WEFT_CIDRS_MAX */

#ifndef WEFT_ORIGDST_MAX
#define WEFT_ORIGDST_MAX 65536 /* redirected connections not yet picked up by the tunnel */
#endif /* WEFT_ORIGDST_MAX */

#ifndef WEFT_PAIRS_MAX
#define WEFT_PAIRS_MAX 65536 /* same-node (src pod, dst pod, port) pairs allowed to splice */
#endif /* WEFT_PAIRS_MAX */

#ifndef WEFT_FASTPATH_SOCKS_MAX
#define WEFT_FASTPATH_SOCKS_MAX 65536 /* spliced sockets (two per same-node connection) */
#endif /* WEFT_FASTPATH_SOCKS_MAX */

#ifndef WEFT_FLOWS_MAX
#define WEFT_FLOWS_MAX 65536 /* flow records; LRU, so the oldest unexported go first */
#endif /* WEFT_FLOWS_MAX */

#ifndef WEFT_FLOW_SAMPLE_NS
#define WEFT_FLOW_SAMPLE_NS 100000000ULL /* at most one flow-record write per 100 ms */
#endif /* WEFT_FLOW_SAMPLE_NS */

#ifndef WEFT_CGROUP_PATH_MAX
#define WEFT_CGROUP_PATH_MAX 496 /* bytes of cgroup path kept in the attachment registry */
#endif /* WEFT_CGROUP_PATH_MAX */

#endif /* WEFT_CONFIG_H */
