// SPDX-License-Identifier: Apache-2.0
//
// Capture for one pod network namespace: an `sk_lookup` program that hands new TCP connections,
// and the pod's DNS queries, to the agent's sockets.
//
// - Inbound: every new connection arriving from outside the pod goes to the agent's inbound
//   (15006) listener, except connections to the HBONE port, which the agent's own 15008
//   listener receives by the normal socket lookup.
// - Outbound: the application's own connections to destinations outside the pod reach this
//   program because the agent's policy routing (see the loader's docs) delivers locally
//   generated TCP locally, over `lo`; they go to the agent's outbound (15001) listener of their
//   family. One slot per family, for the reason the DNS slots below give: the agent's outbound
//   listeners are bound to loopback, so an IPv6 one is v6-only (the kernel makes a socket bound
//   to an IPv6 address other than the wildcard one v6-only) and cannot take an IPv4 lookup.
// - DNS, IPv4 and IPv6: the application's UDP datagrams to port 53, which the agent's policy
//   routing delivers locally over `lo` like outgoing TCP, go to the agent's DNS UDP socket of
//   their family; its TCP connections to port 53 go to the agent's DNS TCP listener of their
//   family (or, while there is none, to the outbound listener as any other connection). One
//   pair of slots per family: the agent's DNS sockets are bound to loopback (127.0.0.1 and
//   ::1, never the wildcard address, which would expose them on the pod's addresses), so
//   neither is dual-stack, and bpf_sk_assign refuses a socket of the other family
//   (-EAFNOSUPPORT; only a dual-stack AF_INET6 socket may take an IPv4 lookup).
//
// sk_lookup runs when the kernel looks up a socket for a TCP SYN or a UDP datagram (every
// datagram: UDP has no connection), after routing has decided the packet is local, and it
// does not rewrite any address: the socket the agent accepts keeps the ORIGINAL destination as
// its local address, and a datagram keeps it as its destination (IP_RECVORIGDSTADDR reads it),
// so no conntrack and no SO_ORIGINAL_DST are needed.
//
// How the two directions are told apart: `ingress_ifindex` is the device of the route that
// made the packet local. For the pod's own address that is eth0 (the address's device), for a
// loopback address and for the capture route (`local default dev lo`) it is `lo`. So a packet
// "received" on lo for a destination that is not a loopback address is the application
// sending out.
//
// What is never steered:
// - anything that is not TCP or UDP over IPv4 or IPv6; UDP other than the application's
//   datagrams to port 53 (UDP arriving from outside the pod included);
// - connections to a loopback address, and connections from the pod's own address to itself;
// - connections from a source address:port the agent has exempted (`agent_delivery`): the
//   agent hands each inbound connection to the application from a socket bound to the
//   client's address, and that connection must not be steered back to the agent (a loop).
//   sk_lookup cannot see the socket mark, so the agent names the exact source instead.
// - inbound connections to the HBONE port (configured by the loader);
// - inbound connections from the configured probe source address (the node's kubelet
//   probes), so health checks keep reaching the application directly.
//
// Fail closed: when the agent's listener for a direction is missing from the map (the agent
// restarts, or has not registered yet) the connection is refused instead of reaching the
// application, or leaving the pod, unchecked. A DNS datagram with no DNS socket in the map
// is dropped (there is no refusal for UDP: the kernel answers "port unreachable" only for a
// local destination address, and the nameserver's is not one, so the resolver waits for its
// timeout and retries); passing it to the normal lookup instead would hand it to any socket of
// the pod bound to the wildcard address and port 53 (a DNS server of the application's own).

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// The loopback device is created first in every network namespace, so its index is always 1.
#define LOOPBACK_IFINDEX 1

// Slots of the agent's sockets in `listeners`. Newer slots come last: a map pinned by an agent
// from before the IPv6 outbound slot has 6 slots (from before IPv6 DNS capture 4, from before
// DNS capture 2), and the loader tells the agent so instead of failing. Such an older program
// steers both families' outbound connections to OUTBOUND_LISTENER_KEY.
#define INBOUND_LISTENER_KEY 0
#define OUTBOUND_LISTENER_KEY 1
#define DNS_UDP_KEY 2
#define DNS_TCP_KEY 3
#define DNS6_UDP_KEY 4
#define DNS6_TCP_KEY 5
#define OUTBOUND6_LISTENER_KEY 6
#define LISTENER_SLOTS 7

#define DNS_PORT 53
#define AF_INET 2

// Set by the loader before the program is loaded (`.rodata`, so the verifier sees constants).
// Ports in host byte order (sk_lookup's `local_port` is host order).
volatile const __u32 hbone_port = 15008;
// The probe source address in network byte order; 0 = no probe bypass.
volatile const __u32 probe_source_ip4 = 0;

// Key of `agent_delivery`: the source of a connection the agent opens towards the application.
struct delivery_key {
	__u32 ip4;  // network order
	__u16 port; // network order
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct delivery_key);
	__type(value, __u8);
} agent_delivery SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, LISTENER_SLOTS);
	__type(key, __u32);
	__type(value, __u32); // a socket fd on update (aya checks a 4-byte value)
} listeners SEC(".maps");

static __always_inline struct bpf_sock *listener(__u32 key)
{
	return bpf_map_lookup_elem(&listeners, &key);
}

// Hands the lookup to `sk` (a reference from `listener`, released here).
static __always_inline int assign(struct bpf_sk_lookup *ctx, struct bpf_sock *sk)
{
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

static __always_inline int steer(struct bpf_sk_lookup *ctx, __u32 key)
{
	struct bpf_sock *sk = listener(key);
	if (!sk)
		return SK_DROP;
	return assign(ctx, sk);
}

// The application's connection out: to the agent's outbound listener of its family. An IPv6
// connection goes to OUTBOUND_LISTENER_KEY while the IPv6 slot is empty: an agent from before
// per-family outbound listeners (adopting this program after a downgrade) registers its one
// outbound listener, an IPv6 one for a pod with an IPv6 address, there.
static __always_inline int steer_outbound(struct bpf_sk_lookup *ctx)
{
	if (ctx->family != AF_INET) {
		struct bpf_sock *sk = listener(OUTBOUND6_LISTENER_KEY);
		if (sk)
			return assign(ctx, sk);
	}
	return steer(ctx, OUTBOUND_LISTENER_KEY);
}

// The application's DNS connection over TCP: to the agent's DNS listener of its family, or
// while there is none to the outbound listener like any other connection.
static __always_inline int steer_dns_tcp(struct bpf_sk_lookup *ctx)
{
	struct bpf_sock *sk = listener(ctx->family == AF_INET ? DNS_TCP_KEY : DNS6_TCP_KEY);
	if (!sk)
		return steer_outbound(ctx);
	return assign(ctx, sk);
}

static __always_inline int is_loopback(struct bpf_sk_lookup *ctx)
{
	if (ctx->family == AF_INET)
		// 127.0.0.0/8; local_ip4 is in network order, so its first byte is the first octet.
		return (ctx->local_ip4 & 0xff) == 127;
	// ::1
	return ctx->local_ip6[0] == 0 && ctx->local_ip6[1] == 0 && ctx->local_ip6[2] == 0 &&
	       ctx->local_ip6[3] == bpf_htonl(1);
}

static __always_inline int to_itself(struct bpf_sk_lookup *ctx)
{
	if (ctx->family == AF_INET)
		return ctx->remote_ip4 == ctx->local_ip4;
	return ctx->remote_ip6[0] == ctx->local_ip6[0] && ctx->remote_ip6[1] == ctx->local_ip6[1] &&
	       ctx->remote_ip6[2] == ctx->local_ip6[2] && ctx->remote_ip6[3] == ctx->local_ip6[3];
}

static __always_inline int try_steer(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol == IPPROTO_UDP) {
		if (ctx->ingress_ifindex == LOOPBACK_IFINDEX && ctx->local_port == DNS_PORT &&
		    !is_loopback(ctx))
			return steer(ctx, ctx->family == AF_INET ? DNS_UDP_KEY : DNS6_UDP_KEY);
		return SK_PASS;
	}
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX) {
		if (is_loopback(ctx))
			return SK_PASS;
		if (ctx->local_port == DNS_PORT)
			return steer_dns_tcp(ctx);
		return steer_outbound(ctx);
	}
	if (ctx->local_port == hbone_port)
		return SK_PASS;
	if (to_itself(ctx))
		return SK_PASS;
	if (ctx->family == AF_INET) {
		if (probe_source_ip4 != 0 && ctx->remote_ip4 == probe_source_ip4)
			return SK_PASS;
		struct delivery_key delivery = {
			.ip4 = ctx->remote_ip4,
			.port = (__u16)ctx->remote_port,
		};
		if (bpf_map_lookup_elem(&agent_delivery, &delivery))
			return SK_PASS;
	}
	return steer(ctx, INBOUND_LISTENER_KEY);
}

SEC("sk_lookup")
int zt_capture(struct bpf_sk_lookup *ctx)
{
	return try_steer(ctx);
}

// No GPL-only helper is used, so the project licence can be declared as is.
char LICENSE[] SEC("license") = "Apache-2.0";
