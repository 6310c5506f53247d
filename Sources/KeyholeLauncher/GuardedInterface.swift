import Foundation
import Synchronization
public import KeyholeNetfilter
public import KeyholePolicy
public import KeyholeProxy
public import KeyholeTLS
public import NIOCore

/// Settings of one guarded interface that do not come from its policy.
public struct GuardSettings: Sendable {
    public var proxyPort: UInt16
    public var queueNumber: UInt16
    public var upstreamMark: UInt32?
    public var firstFlightTimeout: TimeAmount
    public var headTimeout: TimeAmount
    /// Where the appliance records what it installed (so a run after a crash can undo it).
    public var stateDirectory: String?
    /// How long a guest connection may stay open with nothing sent either way.
    public var idleTimeout: TimeAmount
    /// How long a verified upstream connection waits in the pool (zero: no pooling).
    public var upstreamIdleTimeout: TimeAmount
    /// How long a quiet guest connection keeps its upstream connection (zero: for good).
    public var upstreamDetachAfter: TimeAmount
    /// Event loops of the interface's proxy.
    public var threads: Int

    public init(
        proxyPort: UInt16 = 15001, queueNumber: UInt16 = 4242, upstreamMark: UInt32? = 0x4B48,
        firstFlightTimeout: TimeAmount = .seconds(5), headTimeout: TimeAmount = .seconds(30), stateDirectory: String? = nil,
        idleTimeout: TimeAmount = .minutes(5), upstreamIdleTimeout: TimeAmount = .seconds(1), upstreamDetachAfter: TimeAmount = .milliseconds(500),
        threads: Int = ProxyConfiguration.usableCores
    ) {
        self.upstreamDetachAfter = upstreamDetachAfter
        self.idleTimeout = idleTimeout
        self.threads = threads
        self.stateDirectory = stateDirectory
        self.upstreamIdleTimeout = upstreamIdleTimeout
        self.proxyPort = proxyPort
        self.queueNumber = queueNumber
        self.upstreamMark = upstreamMark
        self.firstFlightTimeout = firstFlightTimeout
        self.headTimeout = headTimeout
    }
}

/// The appliance on one guest-facing interface (BRIEF §1): its own proxy listener and
/// DNS observations, the DNS answer queue, and Keyhole's netfilter table for the interface.
/// `keyhole proxy --interface` runs one per interface; `keyhole run` runs one on its TAP.
public final class GuardedInterface: Sendable {
    public let interface: String
    public let policyName: String
    public let rules: ApplianceRules
    public let listening: SocketAddress
    let server: ProxyServer
    let queue: PacketQueue
    let appliance: Appliance

    private init(interface: String, policyName: String, rules: ApplianceRules, listening: SocketAddress, server: ProxyServer, queue: PacketQueue, appliance: Appliance) {
        self.interface = interface
        self.policyName = policyName
        self.rules = rules
        self.listening = listening
        self.server = server
        self.queue = queue
        self.appliance = appliance
    }

    /// The health checks of `/healthz`: rules in place, DNS answer queue bound, listener up.
    public func health() -> [(check: String, ok: Bool)] {
        [("\(interface) rules", appliance.isInstalled()), ("\(interface) dns-queue", queue.isRunning), ("\(interface) listener", server.isListening)]
    }

    /// Starts the proxy, then the queue, then installs the rules: the guest's first SYN
    /// finds a listener, and its first DNS answer a reader. Everything started is undone
    /// when a later step fails. `onTerminate` fires for block-and-terminate.
    public static func start(
        interface: String, policy: Policy, ca: SandboxCA, settings: GuardSettings, audit: AuditLog, metrics: ProxyMetrics,
        onTerminate: @escaping @Sendable (String) -> Void
    ) async throws -> GuardedInterface {
        let tls = try InterceptionTLS(ca: ca, upstreamCAFiles: policy.network.upstreamCA)
        let resolvers = try GuestAddressing.trustedResolvers(for: policy)
        let dns = DNSObservations()
        var configuration = ProxyConfiguration(
            listen: try SocketAddress(ipAddress: "0.0.0.0", port: Int(settings.proxyPort)), upstreamMark: settings.upstreamMark,
            firstFlightTimeout: settings.firstFlightTimeout, headTimeout: settings.headTimeout)
        configuration.alsoIPv6 = true
        configuration.idleTimeout = settings.idleTimeout
        configuration.upstreamIdleTimeout = settings.upstreamIdleTimeout
        configuration.upstreamDetachAfter = settings.upstreamDetachAfter
        configuration.threads = settings.threads
        // A guest's CONNECT goes to what these resolvers say its host is.
        configuration.tunnelResolver = TrustedResolver(servers: resolvers)
        // Egress `public` keeps guests away from the appliance itself: every address this
        // host has now, and the gateway it is about to get.
        configuration.applianceAddresses = Set(LocalAddresses.all() + (policy.network.gateway.map { [$0.address] } ?? []))
        let server = ProxyServer(
            configuration: configuration,
            policy: policy, tls: tls, dns: dns, audit: audit, metrics: metrics, onTerminate: onTerminate)
        let bound = try await server.start()
        let rules = ApplianceRules(
            interface: interface, proxyPort: UInt16(bound.port ?? Int(settings.proxyPort)), queueNumber: settings.queueNumber,
            egress: policy.network.egress, resolvers: resolvers)
        let observer = DNSAnswerObserver(
            dns: dns, policy: DNSAnswerPolicy(egress: policy.network.egress), rules: rules, audit: audit, metrics: metrics, sandbox: policy.name)
        let queue = PacketQueue(number: settings.queueNumber, decide: observer.decide)
        let appliance = Appliance(rules: rules, stateDirectory: settings.stateDirectory)
        do {
            try Appliance.configure(interface: interface, address: policy.network.gateway)
            try queue.start()
            try appliance.install()  // removes what it added when it fails
        } catch {
            queue.stop()
            await server.stop()
            throw error
        }
        return GuardedInterface(
            interface: interface, policyName: policy.name, rules: rules, listening: bound, server: server, queue: queue, appliance: appliance)
    }

    /// New connections use `policy`; existing ones keep theirs.
    public func reload(policy: Policy) { server.reload(policy: policy) }

    /// Removes the rules, then stops the queue and the proxy.
    public func stop() async {
        appliance.remove()
        queue.stop()
        await server.stop()
    }

    /// Cuts the guest off (block-and-terminate on a guest Keyhole did not launch): the
    /// table is replaced by one that drops everything from the interface, the queue and
    /// proxy stop. `stop()` later removes the quarantine too.
    public func quarantine() async {
        appliance.quarantine()
        queue.stop()
        await server.stop()
    }
}

/// Records the guest's DNS answers as pins before the guest sees them; drops answers that
/// rebind a name to an internal address the policy does not open.
final class DNSAnswerObserver: Sendable {
    let dns: DNSObservations
    let policy: DNSAnswerPolicy
    let rules: ApplianceRules
    let audit: AuditLog
    let metrics: ProxyMetrics
    let sandbox: String
    let streams = Mutex(TCPDNSStreams())

    init(dns: DNSObservations, policy: DNSAnswerPolicy, rules: ApplianceRules, audit: AuditLog, metrics: ProxyMetrics, sandbox: String) {
        self.dns = dns
        self.policy = policy
        self.rules = rules
        self.audit = audit
        self.metrics = metrics
        self.sandbox = sandbox
    }

    var decide: @Sendable ([UInt8]) -> Bool {
        { [self] packet in self.verdict(packet) }
    }

    func verdict(_ packet: [UInt8]) -> Bool {
        // Whatever we cannot read passes untouched (it pins nothing).
        guard let payload = try? DNSPacket.dnsPayload(packet) else {
            metrics.dnsAnswer(.unparsed)
            return true
        }
        // Only a trusted resolver's answers reach the guest (the rules send guest DNS only
        // there; this catches whatever else arrives from port 53) and create pins.
        guard rules.resolvers.contains(payload.source.unmapped) else {
            audit.write(
                AuditRecord(
                    level: .warn, event: "dns-untrusted-source", sandbox: sandbox, connection: 0, reason: "not-a-trusted-resolver",
                    action: "drop", destination: payload.source.description))
            metrics.dnsAnswer(.droppedUntrustedSource)
            return false
        }
        // Over TCP, only a whole message at a message boundary of the stream is read.
        guard let message = streams.withLock({ $0.message(in: payload) }) else { return true }
        guard let resolution = try? DNSMessage.parseResponse(Array(message)) else {
            metrics.dnsAnswer(.unparsed)
            return true
        }
        if let bad = resolution.addresses.first(where: { policy.isRebinding($0.address) }) {
            audit.write(
                AuditRecord(
                    level: .warn, event: "dns-rebinding-dropped", sandbox: sandbox, connection: 0, reason: "internal-address",
                    host: resolution.queriedName, destination: bad.address.description))
            metrics.dnsAnswer(.droppedRebinding)
            return false
        }
        if !resolution.addresses.isEmpty { metrics.dnsAnswer(.pinned) }
        for answer in resolution.addresses {
            dns.record(name: resolution.queriedName, address: answer.address, ttl: answer.ttl)
        }
        // Egress host rules apply to the addresses this answer gives, before the guest has them.
        if let allow = rules.egressHostRule(for: resolution.queriedName), !resolution.addresses.isEmpty {
            let script = rules.egressElementScript(allow: allow, addresses: resolution.addresses.map { ($0.address, $0.ttl) })
            if (try? HostCommand.run("/usr/sbin/nft", ["-f", "-"], input: script)) == nil, allow == false {
                // A deny rule we could not install: fail closed, the guest does not get the answer.
                return false
            }
        }
        return true
    }
}
