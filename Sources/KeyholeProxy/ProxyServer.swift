import Foundation
import KeyholeEngine
public import KeyholePolicy
public import KeyholeTLS
public import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How the proxy listens and how long it waits.
public struct ProxyConfiguration: Sendable {
    /// Where REDIRECTed guest flows arrive.
    public var listen: SocketAddress
    /// `SO_MARK` put on the proxy's own upstream sockets, so its rules can exempt them.
    public var upstreamMark: UInt32?
    /// A flow that sends nothing for this long is relayed as opaque (server-speaks-first
    /// protocols); this is also how long a ClientHello or request line may take to arrive.
    public var firstFlightTimeout: TimeAmount
    public var connectTimeout: TimeAmount
    /// A request head that has started must be complete within this time (slowloris).
    public var headTimeout: TimeAmount
    /// Connections idle in both directions for this long are closed.
    public var idleTimeout: TimeAmount
    /// Event loops (one per core by default).
    public var threads: Int
    /// With `listen` on 0.0.0.0: also listen on [::] at the same port (IPv6 only), for
    /// guests whose IPv6 flows are REDIRECTed too (appliance mode).
    public var alsoIPv6: Bool = false
    /// The appliance's own addresses (the guest-facing gateway among them): egress
    /// `public` denies guest flows to them (BRIEF §4 Egress).
    public var applianceAddresses: Set<IPAddress> = []
    /// Bytes all connections may hold at once for body substitution (held `Content-Length`
    /// bodies); a body that does not fit is refused.
    public var heldBodyBudget = 256 * 1024 * 1024
    /// Resolves the host of a guest's `CONNECT` (Keyhole answers CONNECT itself); without
    /// one, a CONNECT to a name is refused.
    public var tunnelResolver: (any TunnelResolver)?
    /// How long a verified upstream TLS connection is kept idle for the next guest
    /// connection to the same name and address (`UpstreamPool`); zero turns pooling off.
    /// Short by default: well below the keep-alive timeouts of common servers (gunicorn's is
    /// 2 s, Node's 5 s), so a pooled connection is not one the upstream is closing just then
    /// (a request written into a closing connection would be lost: the guest sees a reset).
    public var upstreamIdleTimeout: TimeAmount = .seconds(1)
    /// A guest connection kept open but quiet (no upstream traffic) for this long gives its
    /// upstream connection back to the pool, and takes one (or connects and verifies anew)
    /// at its next request; zero keeps every guest connection's upstream for its lifetime.
    public var upstreamDetachAfter: TimeAmount = .milliseconds(500)

    public init(
        listen: SocketAddress, upstreamMark: UInt32? = 0x4B48, firstFlightTimeout: TimeAmount = .seconds(5),
        connectTimeout: TimeAmount = .seconds(10), headTimeout: TimeAmount = .seconds(30), idleTimeout: TimeAmount = .minutes(5),
        threads: Int = ProxyConfiguration.usableCores
    ) {
        self.listen = listen
        self.upstreamMark = upstreamMark
        self.firstFlightTimeout = firstFlightTimeout
        self.connectTimeout = connectTimeout
        self.headTimeout = headTimeout
        self.idleTimeout = idleTimeout
        self.threads = threads
    }
}

extension ProxyConfiguration {
    /// The CPUs this process may run on (`Cpus_allowed` of /proc/self/status: taskset,
    /// cpusets), so a proxy pinned to one core runs one event loop, not one per core.
    public static var usableCores: Int {
        let all = System.coreCount
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
            let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Cpus_allowed:") })
        else { return all }
        let mask = line.dropFirst("Cpus_allowed:".count).filter { $0.isHexDigit }
        let count = mask.reduce(0) { $0 + (Int(String($1), radix: 16) ?? 0).nonzeroBitCount }
        return count > 0 ? min(count, all) : all
    }
}

/// Everything connections share. Immutable but for the policy, which SIGHUP swaps.
final class ProxyShared: Sendable {
    let configuration: ProxyConfiguration
    let tls: InterceptionTLS
    let dns: DNSObservations
    let audit: AuditLog
    let metrics: ProxyMetrics
    let threadPool: NIOThreadPool
    let onTerminate: @Sendable (String) -> Void
    let heldBodies: HeldBodyBudget
    let upstreamPool: UpstreamPool
    private let policies: PolicyStore
    private let nextConnection = Atomic<UInt64>(0)

    init(
        configuration: ProxyConfiguration, policy: Policy, tls: InterceptionTLS, dns: DNSObservations, audit: AuditLog,
        metrics: ProxyMetrics, threadPool: NIOThreadPool, onTerminate: @escaping @Sendable (String) -> Void
    ) {
        self.configuration = configuration
        self.tls = tls
        self.dns = dns
        self.audit = audit
        self.metrics = metrics
        self.threadPool = threadPool
        self.onTerminate = onTerminate
        self.heldBodies = HeldBodyBudget(limit: configuration.heldBodyBudget)
        self.upstreamPool = UpstreamPool(idleTimeout: configuration.upstreamIdleTimeout)
        self.policies = PolicyStore(policy)
    }

    var policy: Policy { policies.policy }

    /// The current generation: a pooled upstream connection is only lent within the
    /// generation it was used under.
    var policyGeneration: UInt64 { policies.generation }

    /// The policy as connections on `loop` use it (`PolicyStore.snapshot(on:)`).
    func currentPolicy(on loop: any EventLoop) -> PolicySnapshot { policies.snapshot(on: loop) }

    /// A new policy: idle upstream connections (verified under the old one) are closed, and
    /// the old snapshots go with the connections still using them.
    func replacePolicy(_ policy: Policy) {
        policies.replace(policy)
        upstreamPool.drain()
    }

    /// `network.egress` for a guest flow's original destination. Host-name rules use the
    /// names trusted DNS answers gave for the address.
    func egressDecision(for destination: SocketAddress) -> EgressDecision {
        guard let address = destination.keyholeIP else { return .denied(rule: "not an IP destination") }
        let egress = policy.network.egress
        let names = egress.hasHostRules ? dns.names(for: address) : []
        return egress.decide(address, names: names, applianceAddresses: configuration.applianceAddresses)
    }

    func newConnectionID() -> UInt64 { nextConnection.add(1, ordering: .relaxed).newValue }
}

/// The transparent intercepting proxy: every flow the netfilter rules REDIRECT to
/// `configuration.listen` is classified (TLS, HTTP, other) and relayed through the
/// substitution engine (BRIEF §1, §4).
public final class ProxyServer: Sendable {
    let shared: ProxyShared
    let group: MultiThreadedEventLoopGroup
    private let channels: Mutex<[any Channel]>

    public init(
        configuration: ProxyConfiguration, policy: Policy, tls: InterceptionTLS, dns: DNSObservations, audit: AuditLog,
        metrics: ProxyMetrics, onTerminate: @escaping @Sendable (String) -> Void
    ) {
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        shared = ProxyShared(
            configuration: configuration, policy: policy, tls: tls, dns: dns, audit: audit, metrics: metrics, threadPool: pool,
            onTerminate: onTerminate)
        group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, configuration.threads))
        channels = Mutex([])
    }

    /// Binds the listener; returns the address it is bound to.
    public func start() async throws -> SocketAddress {
        let shared = self.shared
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(FirstFlightHandler(shared: shared))
                }
            }
        let bound: any Channel
        do {
            bound = try await bootstrap.bind(to: shared.configuration.listen).get()
            channels.withLock { $0.append(bound) }
        } catch {
            throw ProxyError.listen(address: "\(shared.configuration.listen)", reason: "\(error)")
        }
        let address = bound.localAddress ?? shared.configuration.listen
        if shared.configuration.alsoIPv6, let port = address.port, FileManager.default.fileExists(atPath: "/proc/net/if_inet6") {
            do {
                let v6 = try await bootstrap.serverChannelOption(ChannelOptions.Types.SocketOption(level: .ipv6, name: .ipv6_v6only), value: 1)
                    .bind(to: try SocketAddress(ipAddress: "::", port: port)).get()
                channels.withLock { $0.append(v6) }
            } catch {
                await stop()
                throw ProxyError.listen(address: "[::]:\(port)", reason: "\(error)")
            }
        }
        return address
    }

    /// Whether every listener is bound and open (for health checks).
    public var isListening: Bool { channels.withLock { !$0.isEmpty && $0.allSatisfy(\.isActive) } }

    /// New connections use `policy`; existing ones keep the policy they started with.
    public func reload(policy: Policy) { shared.replacePolicy(policy) }

    public var metrics: ProxyMetrics { shared.metrics }

    public func stop() async {
        let bound = channels.withLock { c -> [any Channel] in
            defer { c = [] }
            return c
        }
        for listener in bound { try? await listener.close() }
        shared.upstreamPool.drain()
        try? await group.shutdownGracefully()
        try? await shared.threadPool.shutdownGracefully()
        shared.audit.flush()
    }
}

// MARK: - Original destination

enum OriginalDestination {
    static let soOriginalDst: Int32 = 80  // SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST

    /// The address the guest connected to before netfilter REDIRECTed it here.
    static func of(_ channel: any Channel) -> EventLoopFuture<SocketAddress> {
        guard let provider = channel as? any SocketOptionProvider else {
            return channel.eventLoop.makeFailedFuture(ChannelError.operationUnsupported)
        }
        if case .v6 = channel.localAddress {
            let future: EventLoopFuture<sockaddr_in6> = provider.unsafeGetSocketOption(level: SocketOptionLevel(IPPROTO_IPV6), name: soOriginalDst)
            return future.map { SocketAddress($0) }
        }
        let future: EventLoopFuture<sockaddr_in> = provider.unsafeGetSocketOption(level: SocketOptionLevel(IPPROTO_IP), name: soOriginalDst)
        return future.map { SocketAddress($0) }
    }
}

// Plain C address structs, read once from getsockopt on the event loop.
extension sockaddr_in: @retroactive @unchecked Sendable {}
extension sockaddr_in6: @retroactive @unchecked Sendable {}

extension SocketAddress {
    /// The address as an `IPAddress` (nil for Unix sockets).
    var keyholeIP: IPAddress? {
        switch self {
        case .v4(let v4):
            return .v4(UInt32(bigEndian: v4.address.sin_addr.s_addr))
        case .v6(let v6):
            var address = v6.address.sin6_addr
            let bytes = withUnsafeBytes(of: &address) { Array($0) }
            return IPAddress(v6Bytes: bytes).unmapped
        case .unixDomainSocket:
            return nil
        }
    }
}
