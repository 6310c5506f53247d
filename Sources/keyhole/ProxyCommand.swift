import ArgumentParser
import Dispatch
import Foundation
import KeyholeNetfilter
import KeyholePolicy
import KeyholeProxy
import KeyholeTLS
import NIOCore
import NIOPosix

struct ProxyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "proxy",
        abstract: "Run the intercepting proxy for a guest.",
        discussion: """
            With --interface, Keyhole is a drop-in appliance for the guest behind that interface: \
            it installs its own netfilter rules (every guest TCP flow to the proxy, DNS answers \
            through NFQUEUE, QUIC dropped, egress rules, masquerade), observes DNS, and removes \
            the rules on exit. With --listen, it serves flows that your own rules REDIRECT to that \
            address (SO_ORIGINAL_DST); its upstream connections carry SO_MARK --upstream-mark so \
            your rules can exempt them.

            SIGINT/SIGTERM stop it; SIGHUP reloads the policy for new connections (an invalid \
            policy is refused and the running one stays). Exit status: 0 stopped, 1 could not \
            start, 2 usage or policy error, 4 a guest was terminated (block-and-terminate).
            """
    )

    @Option(help: ArgumentHelp("Policy file.", valueName: "file"))
    var policy: String

    @Option(
        help: ArgumentHelp(
            "Guest-facing interface: install Keyhole's netfilter rules on it and observe the guest's DNS (appliance mode).",
            valueName: "iface"))
    var interface: String?

    @Option(help: ArgumentHelp("Appliance mode: the port REDIRECTed flows go to.", valueName: "port"))
    var proxyPort: UInt16 = 15001

    @Option(help: ArgumentHelp("Appliance mode: the NFQUEUE number for DNS answers.", valueName: "n"))
    var queueNum: UInt16 = 4242

    @Option(help: ArgumentHelp("Address the REDIRECTed flows arrive at.", valueName: "host:port"))
    var listen: String?

    @OptionGroup var state: StateOptions

    @Option(help: ArgumentHelp("Append audit events (JSON lines) to this file (default: stderr).", valueName: "file"))
    var auditLog: String?

    @Option(help: ArgumentHelp("Serve Prometheus metrics at http://ADDR/metrics.", valueName: "host:port"))
    var metrics: String?

    @Option(
        name: .customLong("pin"),
        help: ArgumentHelp("A static DNS pin NAME=IP, as if a DNS answer had been observed (repeatable).", valueName: "name=ip"))
    var pins: [String] = []

    @Option(help: ArgumentHelp("SO_MARK for the proxy's upstream sockets (0 disables).", valueName: "n"))
    var upstreamMark: UInt32 = 0x4B48

    @Option(help: ArgumentHelp("Seconds to wait for a flow's first bytes before relaying it as opaque.", valueName: "s"))
    var firstFlightTimeout: Double = 5

    @Option(help: ArgumentHelp("Seconds a started request head may take to complete (slowloris defence).", valueName: "s"))
    var headTimeout: Double = 30

    func validate() throws {
        if let interface, let problem = ApplianceRules.interfaceProblem(interface) {
            throw ValidationError("--interface '\(interface)' \(problem)")
        }
        if listen == nil && interface == nil { throw ValidationError("give --interface IFACE (appliance) or --listen HOST:PORT (your own rules)") }
        for pin in pins where Self.parsePin(pin) == nil {
            throw ValidationError("--pin '\(pin)' must be NAME=IP, such as api.example.com=203.0.113.10")
        }
        if firstFlightTimeout <= 0 { throw ValidationError("--first-flight-timeout must be positive") }
        if headTimeout <= 0 { throw ValidationError("--head-timeout must be positive") }
    }

    static func parsePin(_ text: String) -> (String, IPAddress)? {
        let parts = text.split(separator: "=", maxSplits: 1)
        guard parts.count == 2, HostName.problem(with: HostName.normalize(parts[0])) == nil, let ip = IPAddress(parts[1]) else { return nil }
        return (HostName.normalize(parts[0]), ip)
    }

    static func parseAddress(_ text: String) throws -> SocketAddress {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]) else {
            throw ValidationError("'\(text)' must be HOST:PORT")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        do {
            return try SocketAddress(ipAddress: host, port: port)
        } catch {
            throw ValidationError("'\(text)' must be an IP address and a port")
        }
    }

    func run() async throws {
        let loaded = try PolicyFile.load(policy)
        for warning in loaded.warnings { Output.err(warning.description) }
        let listenAddress = try Self.parseAddress(listen ?? "0.0.0.0:\(proxyPort)")
        let metricsAddress = try metrics.map(Self.parseAddress)

        let ca: SandboxCA
        let tls: InterceptionTLS
        let audit: AuditLog
        do {
            ca = try SandboxCA.loadOrCreate(stateDirectory: state.resolved)
            tls = try InterceptionTLS(ca: ca, upstreamCAFiles: loaded.network.upstreamCA)
            audit = try auditLog.map { path throws(ProxyError) in try AuditLog(path: path) } ?? AuditLog()
        } catch {
            Output.err("keyhole proxy: \(error)")
            throw ExitCode(1)
        }
        let dns = DNSObservations()
        for pin in pins {
            let (name, ip) = Self.parsePin(pin)!
            dns.record(name: name, address: ip, ttl: UInt32(Int32.max))
        }
        let proxyMetrics = ProxyMetrics()
        let events = AsyncStream<ProxyEvent>.makeStream()
        let server = ProxyServer(
            configuration: ProxyConfiguration(
                listen: listenAddress, upstreamMark: upstreamMark == 0 ? nil : upstreamMark,
                firstFlightTimeout: .milliseconds(Int64(firstFlightTimeout * 1000)),
                headTimeout: .milliseconds(Int64(headTimeout * 1000))),
            policy: loaded, tls: tls, dns: dns, audit: audit, metrics: proxyMetrics,
            onTerminate: { reason in events.continuation.yield(.terminate(reason)) })
        let bound: SocketAddress
        do {
            bound = try await server.start()
        } catch {
            Output.err("keyhole proxy: \(error)")
            throw ExitCode(1)
        }
        // Appliance mode: the interface, forwarding, the DNS answer queue, then the rules.
        var appliance: Appliance?
        var queue: PacketQueue?
        var forwarding: [String: String] = [:]
        if let interface {
            let rules = ApplianceRules(
                interface: interface, proxyPort: UInt16(bound.port ?? Int(proxyPort)), queueNumber: queueNum,
                egress: loaded.network.egress, resolvers: loaded.network.dns)
            let observer = DNSAnswerObserver(
                dns: dns, policy: DNSAnswerPolicy(egress: loaded.network.egress), audit: audit, metrics: proxyMetrics, sandbox: loaded.name)
            do {
                try Appliance.configure(interface: interface, address: loaded.network.gateway)
                forwarding = Appliance.enableForwarding()
                let packetQueue = PacketQueue(number: queueNum, decide: observer.decide)
                try packetQueue.start()
                queue = packetQueue
                let installed = Appliance(rules: rules)
                try installed.install()
                appliance = installed
            } catch {
                Output.err("keyhole proxy: \(error)")
                queue?.stop()
                Appliance.restore(forwarding)
                await server.stop()
                throw ExitCode(1)
            }
            Output.err("keyhole proxy: guarding \(interface) (nft table inet \(rules.tableName), DNS answers on NFQUEUE \(queueNum))")
        }
        var metricsServer: MetricsServer?
        if let metricsAddress {
            let serverForMetrics = MetricsServer(metrics: proxyMetrics)
            do {
                let at = try await serverForMetrics.start(at: metricsAddress)
                Output.err("keyhole proxy: metrics at http://\(at.ipAddress ?? "?"):\(at.port ?? 0)/metrics")
                metricsServer = serverForMetrics
            } catch {
                Output.err("keyhole proxy: \(error)")
                await server.stop()
                throw ExitCode(1)
            }
        }
        Output.err("keyhole proxy: listening on \(bound.ipAddress ?? "?"):\(bound.port ?? 0) for sandbox \(loaded.name)")
        Output.err("keyhole proxy: guests must trust \(ca.certificatePath)")
        for secret in loaded.secrets { Output.out("\(secret.env)=\(secret.placeholder)") }

        let signals = SignalWatcher(signals: [SIGINT, SIGTERM, SIGHUP]) { signal in
            events.continuation.yield(signal == SIGHUP ? .reload : .stop)
        }
        var exitCode: Int32 = 0
        loop: for await event in events.stream {
            switch event {
            case .stop:
                break loop
            case .reload:
                do {
                    let fresh = try PolicyLoader().load(file: policy)
                    server.reload(policy: fresh)
                    Output.err("keyhole proxy: reloaded \(policy) for new connections")
                } catch {
                    Output.err("keyhole proxy: kept the running policy; \(policy) is invalid:")
                    for diagnostic in error.diagnostics { Output.err(diagnostic.description) }
                }
            case .terminate(let reason):
                Output.err("keyhole proxy: block-and-terminate: \(reason); stopping")
                exitCode = 4
                break loop
            }
        }
        signals.cancel()
        appliance?.remove()
        queue?.stop()
        if interface != nil { Appliance.restore(forwarding) }
        await server.stop()
        await metricsServer?.stop()
        if exitCode != 0 { throw ExitCode(exitCode) }
    }
}

enum ProxyEvent: Sendable {
    case stop
    case reload
    case terminate(String)
}

/// Delivers POSIX signals on a dispatch queue instead of async-signal context.
final class SignalWatcher {
    let sources: [any DispatchSourceSignal]

    init(signals: [Int32], handler: @escaping @Sendable (Int32) -> Void) {
        var sources: [any DispatchSourceSignal] = []
        for number in signals {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { handler(number) }
            source.resume()
            sources.append(source)
        }
        self.sources = sources
    }

    func cancel() {
        for source in sources { source.cancel() }
    }
}

/// Records the guest's DNS answers as pins before the guest sees them; drops answers that
/// rebind a name to an internal address the policy does not open.
final class DNSAnswerObserver: Sendable {
    let dns: DNSObservations
    let policy: DNSAnswerPolicy
    let audit: AuditLog
    let metrics: ProxyMetrics
    let sandbox: String

    init(dns: DNSObservations, policy: DNSAnswerPolicy, audit: AuditLog, metrics: ProxyMetrics, sandbox: String) {
        self.dns = dns
        self.policy = policy
        self.audit = audit
        self.metrics = metrics
        self.sandbox = sandbox
    }

    var decide: @Sendable ([UInt8]) -> Bool {
        { [self] packet in self.verdict(packet) }
    }

    func verdict(_ packet: [UInt8]) -> Bool {
        // Whatever we cannot read passes untouched (it pins nothing).
        guard let payload = try? DNSPacket.dnsPayload(packet),
            let resolution = try? DNSMessage.parseResponse(Array(payload.dns))
        else {
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
        return true
    }
}
