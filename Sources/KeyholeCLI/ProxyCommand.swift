import ArgumentParser
import Dispatch
import Foundation
import KeyholeLauncher
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
            policy is refused and the running one stays); SIGUSR1 reopens the audit log file \
            (for logrotate). Under systemd it reports READY=1 once guarding. Exit status: 0 stopped, 1 could not \
            start, 2 usage or policy error, 4 a guest was terminated (block-and-terminate).
            """
    )

    @Option(
        name: .customLong("policy"),
        help: ArgumentHelp("Policy file; with several --interface, one per interface, in the same order.", valueName: "file"))
    var policies: [String] = []

    @Option(
        name: .customLong("interface"),
        help: ArgumentHelp(
            "Guest-facing interface: install Keyhole's netfilter rules on it and observe the guest's DNS (appliance mode). Repeatable.",
            valueName: "iface"))
    var interfaces: [String] = []

    @Option(help: ArgumentHelp("Appliance mode: the port REDIRECTed flows go to (the n-th interface uses port+n-1).", valueName: "port"))
    var proxyPort: UInt16 = 15001

    @Option(help: ArgumentHelp("Appliance mode: the NFQUEUE number for DNS answers (the n-th interface uses n+i-1).", valueName: "n"))
    var queueNum: UInt16 = 4242

    @Option(help: ArgumentHelp("Address the REDIRECTed flows arrive at.", valueName: "host:port"))
    var listen: String?

    @OptionGroup var state: StateOptions

    @OptionGroup var secretFlags: SecretFlags

    @Option(help: ArgumentHelp("Append audit events (JSON lines) to this file (reopened on SIGUSR1), or `syslog` for the local syslog socket (/dev/log, journald too); default: stderr.", valueName: "file"))
    var auditLog: String?

    @Option(help: ArgumentHelp("Serve Prometheus metrics at http://ADDR/metrics and health at /healthz (200, or 503 when rules, DNS queue or listener are not in place).", valueName: "host:port"))
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

    @Option(help: ArgumentHelp("Seconds a guest connection may stay open with nothing sent either way before it is reset.", valueName: "s"))
    var idleTimeout: Double = 300

    @Option(
        help: ArgumentHelp(
            "Seconds a verified upstream TLS connection is kept idle for the guest's next connection to the same name and address (0: no pooling).",
            valueName: "s"))
    var upstreamIdleTimeout: Double = 1

    @Option(
        help: ArgumentHelp(
            "Seconds a guest connection may stay open without upstream traffic before its upstream connection goes back to the pool (0: kept for the guest connection's lifetime).",
            valueName: "s"))
    var upstreamDetachAfter: Double = 0.5

    @Option(
        help: ArgumentHelp(
            "Event loops (threads) per guarded interface or listener; default: one per CPU this process may run on. Idle upstream connections are pooled per event loop.",
            valueName: "n"))
    var threads: Int?

    func validate() throws {
        for interface in interfaces {
            if let problem = ApplianceRules.interfaceProblem(interface) { throw ValidationError("--interface '\(interface)' \(problem)") }
        }
        if Set(interfaces).count != interfaces.count { throw ValidationError("each --interface may be given once") }
        if listen == nil && interfaces.isEmpty { throw ValidationError("give --interface IFACE (appliance) or --listen HOST:PORT (your own rules)") }
        if listen != nil && !interfaces.isEmpty { throw ValidationError("--listen and --interface exclude each other") }
        let flagsOnly = policies.isEmpty && !secretFlags.commandLine.isEmpty
        if policies.isEmpty && !flagsOnly { throw ValidationError("missing --policy FILE (or flags: --secret ENV@HOST)") }
        if flagsOnly && interfaces.count > 1 { throw ValidationError("with several --interface, give one --policy per interface (flags apply to each)") }
        if listen != nil && policies.count > 1 { throw ValidationError("--listen serves one --policy") }
        if !interfaces.isEmpty && !flagsOnly && policies.count != interfaces.count {
            throw ValidationError("give one --policy per --interface, in the same order (\(interfaces.count) interfaces, \(policies.count) policies)")
        }
        if !interfaces.isEmpty && (Int(proxyPort) + interfaces.count - 1 > 65535 || Int(queueNum) + interfaces.count - 1 > 65535) {
            throw ValidationError("--proxy-port/--queue-num leave no room for \(interfaces.count) interfaces")
        }
        if !pins.isEmpty && !interfaces.isEmpty { throw ValidationError("--pin is for --listen mode; in appliance mode pins come from the guest's DNS answers") }
        for pin in pins where Self.parsePin(pin) == nil {
            throw ValidationError("--pin '\(pin)' must be NAME=IP, such as api.example.com=203.0.113.10")
        }
        if firstFlightTimeout <= 0 { throw ValidationError("--first-flight-timeout must be positive") }
        if headTimeout <= 0 { throw ValidationError("--head-timeout must be positive") }
        if idleTimeout <= 0 || idleTimeout > 86400 { throw ValidationError("--idle-timeout must be more than 0 and at most 86400 seconds") }
        if let threads, !(1...256).contains(threads) { throw ValidationError("--threads must be 1 to 256") }
        if upstreamDetachAfter < 0 || upstreamDetachAfter > 3600 { throw ValidationError("--upstream-detach-after must be 0 to 3600 seconds") }
        if upstreamIdleTimeout < 0 || upstreamIdleTimeout > 3600 { throw ValidationError("--upstream-idle-timeout must be 0 to 3600 seconds") }
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
        let flags = secretFlags.commandLine
        // Each policy file with the flags merged in; with no file, the flags alone.
        let sources: [String?] = policies.isEmpty ? [nil] : policies
        var loaded: [Policy] = []
        for path in sources {
            let policy = try PolicyFile.load(path, flags: flags)
            for warning in policy.warnings { Output.err(warning.description) }
            loaded.append(policy)
        }
        let metricsAddress = try metrics.map(Self.parseAddress)
        let ca: SandboxCA
        let audit: AuditLog
        do {
            ca = try SandboxCA.loadOrCreate(stateDirectory: state.resolved)
            audit = try auditLog.map { path throws(ProxyError) in try AuditLog(path: path) } ?? AuditLog()
        } catch {
            Output.err("keyhole proxy: \(error)")
            throw ExitCode(1)
        }
        let registry = MetricsRegistry()
        let events = AsyncStream<ProxyEvent>.makeStream()
        let served: Served
        do {
            if let listen {
                served = try await .listener(startListener(listen, policy: loaded[0], ca: ca, audit: audit, metrics: registry.metrics(), events: events.continuation))
            } else {
                let (guards, forwarding) = try await startInterfaces(loaded, ca: ca, audit: audit, registry: registry, events: events.continuation)
                served = .interfaces(guards, forwarding: forwarding)
            }
        } catch let error as ExitCode {
            throw error
        } catch {
            Output.err("keyhole proxy: \(error)")
            throw ExitCode(1)
        }
        var metricsServer: MetricsServer?
        if let metricsAddress {
            let serverForMetrics = MetricsServer(registry: registry, health: served.health)
            do {
                let at = try await serverForMetrics.start(at: metricsAddress)
                Output.err("keyhole proxy: metrics at http://\(at.ipAddress ?? "?"):\(at.port ?? 0)/metrics")
                metricsServer = serverForMetrics
            } catch {
                Output.err("keyhole proxy: \(error)")
                await served.stop()
                throw ExitCode(1)
            }
        }
        Output.err("keyhole proxy: guests must trust \(ca.certificatePath); `keyhole ca install-script --state-dir \(state.resolved)` prints a script that installs it in a guest")
        var printed: Set<String> = []
        for policy in loaded {
            for secret in policy.secrets where printed.insert("\(secret.env)=\(secret.placeholder)").inserted {
                Output.out("\(secret.env)=\(secret.placeholder)")
            }
        }

        let signals = SignalWatcher(signals: [SIGINT, SIGTERM, SIGHUP, SIGUSR1]) { signal in
            events.continuation.yield(signal == SIGHUP ? .reload : signal == SIGUSR1 ? .reopenLog : .stop)
        }
        // Rules installed, DNS queue bound, listeners up: tell the service manager.
        SystemdNotify.send("READY=1\nSTATUS=" + served.status)
        var exitCode: Int32 = 0
        loop: for await event in events.stream {
            switch event {
            case .stop:
                break loop
            case .reopenLog:
                do {
                    try audit.reopen()
                } catch {
                    Output.err("keyhole proxy: \(error); records go on to the old file")
                }
            case .reload:
                SystemdNotify.send("RELOADING=1\nMONOTONIC_USEC=\(SystemdNotify.monotonicMicroseconds)")
                served.reload(sources, flags: flags)
                SystemdNotify.send("READY=1\nSTATUS=" + served.status)
            case .terminate(let reason, let interface):
                exitCode = 4
                guard case .interfaces(let guards, _) = served, guards.count > 1, let interface,
                    let cut = guards.first(where: { $0.interface == interface })
                else {
                    Output.err("keyhole proxy: block-and-terminate: \(reason); stopping")
                    break loop
                }
                // Several guests: cut this one off, keep serving the others.
                Output.err("keyhole proxy: block-and-terminate: \(reason); \(interface) is cut off until keyhole proxy stops")
                await cut.quarantine()
            }
        }
        signals.cancel()
        SystemdNotify.send("STOPPING=1")
        await served.stop()
        await metricsServer?.stop()
        if exitCode != 0 { throw ExitCode(exitCode) }
    }

    /// `--listen`: the proxy alone, for the operator's own REDIRECT rules.
    private func startListener(
        _ listen: String, policy: Policy, ca: SandboxCA, audit: AuditLog, metrics: ProxyMetrics,
        events: AsyncStream<ProxyEvent>.Continuation
    ) async throws -> ProxyServer {
        let dns = DNSObservations()
        for pin in pins {
            let (name, ip) = Self.parsePin(pin)!
            dns.record(name: name, address: ip, ttl: UInt32(Int32.max))
        }
        var configuration = ProxyConfiguration(
            listen: try Self.parseAddress(listen), upstreamMark: upstreamMark == 0 ? nil : upstreamMark,
            firstFlightTimeout: .milliseconds(Int64(firstFlightTimeout * 1000)),
            headTimeout: .milliseconds(Int64(headTimeout * 1000)))
        configuration.idleTimeout = .milliseconds(Int64(idleTimeout * 1000))
        configuration.upstreamIdleTimeout = .milliseconds(Int64(upstreamIdleTimeout * 1000))
        configuration.upstreamDetachAfter = .milliseconds(Int64(upstreamDetachAfter * 1000))
        if let threads { configuration.threads = threads }
        // A guest's CONNECT host is resolved through network.dns, else this host's resolvers.
        configuration.tunnelResolver = (try? GuestAddressing.trustedResolvers(for: policy)).map { TrustedResolver(servers: $0) }
        let server = ProxyServer(
            configuration: configuration,
            policy: policy, tls: try InterceptionTLS(ca: ca, upstreamCAFiles: policy.network.upstreamCA), dns: dns, audit: audit,
            metrics: metrics, onTerminate: { reason in events.yield(.terminate(reason, interface: nil)) })
        let bound = try await server.start()
        Output.err("keyhole proxy: listening on \(bound.ipAddress ?? "?"):\(bound.port ?? 0) for sandbox \(policy.name)")
        return server
    }

    /// `--interface` (one or more): forwarding on, then one guarded interface each; returns
    /// them and the forwarding settings to restore.
    private func startInterfaces(
        _ loaded: [Policy], ca: SandboxCA, audit: AuditLog, registry: MetricsRegistry, events: AsyncStream<ProxyEvent>.Continuation
    ) async throws -> ([GuardedInterface], [String: String]) {
        let forwarding = Appliance.enableForwarding()
        var guards: [GuardedInterface] = []
        for (index, interface) in interfaces.enumerated() {
            let settings = GuardSettings(
                proxyPort: proxyPort + UInt16(index), queueNumber: queueNum + UInt16(index), upstreamMark: upstreamMark == 0 ? nil : upstreamMark,
                firstFlightTimeout: .milliseconds(Int64(firstFlightTimeout * 1000)), headTimeout: .milliseconds(Int64(headTimeout * 1000)),
                stateDirectory: state.resolved, idleTimeout: .milliseconds(Int64(idleTimeout * 1000)), upstreamIdleTimeout: .milliseconds(Int64(upstreamIdleTimeout * 1000)),
                upstreamDetachAfter: .milliseconds(Int64(upstreamDetachAfter * 1000)),
                threads: threads ?? ProxyConfiguration.usableCores)
            do {
                // Each interface's counters carry its sandbox and interface (one /metrics for all).
                let labelled = registry.metrics(labels: [("sandbox", loaded[index].name), ("interface", interface)])
                let guarded = try await GuardedInterface.start(
                    interface: interface, policy: loaded[index], ca: ca, settings: settings, audit: audit, metrics: labelled,
                    onTerminate: { reason in events.yield(.terminate(reason, interface: interface)) })
                guards.append(guarded)
            } catch {
                for started in guards { await started.stop() }
                Appliance.restore(forwarding)
                throw error
            }
            let guarded = guards[index]
            Output.err(
                "keyhole proxy: guarding \(interface) for sandbox \(guarded.policyName) (nft table inet \(guarded.rules.tableName), "
                    + "proxy port \(guarded.listening.port ?? 0), DNS answers on NFQUEUE \(guarded.rules.queueNumber); "
                    + "trusted resolvers \(guarded.rules.resolvers.map(\.description).joined(separator: ", "))"
                    + (loaded[index].network.dns.isEmpty ? " from /etc/resolv.conf" : " from network.dns")
                    + ": guest DNS to any other address goes there)")
        }
        return (guards, forwarding)
    }
}

/// What `keyhole proxy` is running: one listener, or guarded interfaces.
enum Served {
    case listener(ProxyServer)
    case interfaces([GuardedInterface], forwarding: [String: String])

    /// The checks `/healthz` reports.
    var health: MetricsServer.HealthChecks {
        switch self {
        case .listener(let server): return { [("listener", server.isListening)] }
        case .interfaces(let guards, _): return { guards.flatMap { $0.health() } }
        }
    }

    /// One line for the service manager's status.
    var status: String {
        switch self {
        case .listener: return "listening"
        case .interfaces(let guards, _): return "guarding " + guards.map(\.interface).joined(separator: ", ")
        }
    }

    /// SIGHUP: each policy file is reloaded (the flags merged in again); an invalid one is
    /// refused and keeps running.
    func reload(_ paths: [String?], flags: CommandLinePolicy) {
        let targets: [(String?, (Policy) -> Void)]
        switch self {
        case .listener(let server): targets = [(paths[0], server.reload(policy:))]
        case .interfaces(let guards, _): targets = zip(paths, guards).map { ($0, $1.reload(policy:)) }
        }
        for (path, apply) in targets {
            let shown = path ?? "the command line's policy"
            do {
                apply(try flags.apply(to: path.map { path throws(PolicyError) in try PolicyLoader().load(file: path) }))
                Output.err("keyhole proxy: reloaded \(shown) for new connections")
            } catch {
                Output.err("keyhole proxy: kept the running policy; \(shown) is invalid:")
                for diagnostic in error.diagnostics { Output.err(diagnostic.description) }
            }
        }
    }

    func stop() async {
        switch self {
        case .listener(let server):
            await server.stop()
        case .interfaces(let guards, let forwarding):
            for guarded in guards { await guarded.stop() }
            Appliance.restore(forwarding)
        }
    }
}

enum ProxyEvent: Sendable {
    case stop
    case reload
    case reopenLog
    case terminate(String, interface: String?)
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
