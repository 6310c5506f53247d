import Foundation
public import KeyholePolicy
import KeyholeLauncher
import KeyholeNetfilter
import KeyholeProxy
import KeyholeTLS
import Synchronization

/// Builds the drop-in appliance for a VM that already runs (or any guest-facing interface):
/// what `keyhole proxy --interface IFACE` does, from Swift. Every setter returns the same
/// builder.
///
/// ```swift
/// let appliance = try await Appliance.builder(interface: "tap0")
///     .secretEnv("GITHUB_TOKEN", value: token, allowedHost: "api.github.com")
///     .network { $0.onSecretViolation(.blockAndLog) }
///     .start()
/// // give the guest appliance.placeholders and trust appliance.caCertificatePath
/// await appliance.stop()
/// ```
public final class ApplianceBuilder: NetworkConfigurable {
    let interface: String
    var name: String?
    public var networkSettings = NetworkSettings()
    var stateDirectory: String?
    var audit: AuditDestination = .standardError
    var proxyPort: UInt16 = 15001
    var queueNumber: UInt16 = 4242

    init(interface: String) { self.interface = interface }

    /// The sandbox name in audit events and metrics. Default: the interface's name.
    @discardableResult public func name(_ name: String) -> ApplianceBuilder { self.name = name; return self }






    /// Where the sandbox CA lives. Default `$KEYHOLE_STATE_DIR`, else `/var/lib/keyhole`.
    @discardableResult public func stateDirectory(_ path: String) -> ApplianceBuilder { stateDirectory = path; return self }
    /// Where audit events are written besides `Appliance.auditEvents`. Default standard error.
    @discardableResult public func auditLog(_ destination: AuditDestination) -> ApplianceBuilder { audit = destination; return self }
    /// The port the guest's flows are redirected to. Default 15001.
    @discardableResult public func proxyPort(_ port: UInt16) -> ApplianceBuilder { proxyPort = port; return self }
    /// The NFQUEUE number for the guest's DNS answers. Default 4242.
    @discardableResult public func queueNumber(_ number: UInt16) -> ApplianceBuilder { queueNumber = number; return self }

    /// The policy this builder describes, checked with the policy file's rules.
    public func policy() throws(SandboxError) -> Policy {
        let fallback = PolicyLoaderName.valid(interface) ? interface : "appliance"
        return try Sandbox.validate(
            [("name", .string(name ?? fallback)), ("secrets", .list(networkSettings.secrets.map(\.document))), ("network", networkSettings.document)],
            origin: "appliance on \(interface)")
    }

    /// Installs the rules on the interface, binds the DNS answer queue and starts the proxy.
    /// Needs root. block-and-terminate cuts the guest off (everything from the interface is
    /// dropped until `stop()`).
    public func start() async throws -> Appliance {
        guard geteuid() == 0 else { throw SandboxError.needsRoot }
        if let problem = ApplianceRules.interfaceProblem(interface) {
            throw SandboxError.invalidConfiguration(["interface '\(interface)' \(problem)"])
        }
        let policy = try policy()
        let state = stateDirectory ?? StateDirectory.resolved()
        let (log, events) = try AuditDestination.open(audit)
        let ca = try SandboxCA.loadOrCreate(stateDirectory: state)
        let forwarding = KeyholeNetfilter.Appliance.enableForwarding()
        let terminated = FirstReason()
        let guarded: GuardedInterface
        do {
            let cut = CutOff()
            guarded = try await GuardedInterface.start(
                interface: interface, policy: policy, ca: ca,
                settings: GuardSettings(proxyPort: proxyPort, queueNumber: queueNumber, stateDirectory: state), audit: log,
                metrics: ProxyMetrics(),
                onTerminate: { reason in
                    terminated.note(reason)
                    cut.fire()
                })
            cut.arm { await guarded.quarantine() }
        } catch {
            KeyholeNetfilter.Appliance.restore(forwarding)
            events.continuation.finish()
            throw SandboxError.startFailed("\(error)")
        }
        return Appliance(
            interface: interface, policy: policy, caCertificatePath: ca.certificatePath, guarded: guarded, forwarding: forwarding,
            terminated: terminated, audit: events)
    }
}

/// The appliance on one interface, running. End it with `stop()`: it removes its rules.
public final class Appliance: Sendable {
    public let interface: String
    /// Each secret's guest environment variable and the placeholder to give the guest.
    public let placeholders: [String: String]
    /// The sandbox CA certificate the guest must trust (`keyhole ca install-script`).
    public let caCertificatePath: String
    /// Audit events as they happen: one consumer; the newest 10,000 kept. Ends on `stop()`.
    public let auditEvents: AsyncStream<AuditEvent>

    let guarded: GuardedInterface
    let forwarding: [String: String]
    let terminated: FirstReason
    let auditContinuation: AsyncStream<AuditEvent>.Continuation
    let stopped = Mutex(false)

    init(
        interface: String, policy: Policy, caCertificatePath: String, guarded: GuardedInterface, forwarding: [String: String],
        terminated: FirstReason, audit: (AsyncStream<AuditEvent>, AsyncStream<AuditEvent>.Continuation)
    ) {
        self.interface = interface
        placeholders = Dictionary(policy.secrets.map { ($0.env, $0.placeholder) }, uniquingKeysWith: { a, _ in a })
        self.caCertificatePath = caCertificatePath
        self.guarded = guarded
        self.forwarding = forwarding
        self.terminated = terminated
        (auditEvents, auditContinuation) = audit
    }

    public static func builder(interface: String) -> ApplianceBuilder { ApplianceBuilder(interface: interface) }

    /// Why block-and-terminate cut the guest off, once it has.
    public var terminationReason: String? { terminated.reason }

    /// Removes the rules (the ruleset is as it was before `start`), unbinds the queue, stops
    /// the proxy. Safe to call twice.
    public func stop() async {
        guard stopped.withLock({ state in defer { state = true }; return !state }) else { return }
        await guarded.stop()
        KeyholeNetfilter.Appliance.restore(forwarding)
        auditContinuation.finish()
    }
}

/// The first block-and-terminate reason.
final class FirstReason: Sendable {
    private let state = Mutex<String?>(nil)
    var reason: String? { state.withLock { $0 } }
    func note(_ reason: String) { state.withLock { $0 = $0 ?? reason } }
}

/// block-and-terminate fires from the proxy before `start` has the interface to cut off:
/// the action waits for it.
final class CutOff: Sendable {
    private struct State {
        var action: (@Sendable () async -> Void)?
        var fired = false
    }
    private let state = Mutex(State())

    func arm(_ action: @escaping @Sendable () async -> Void) {
        let fire = state.withLock { state in
            state.action = action
            return state.fired
        }
        if fire { Task { await action() } }
    }

    func fire() {
        let action = state.withLock { state in
            state.fired = true
            return state.action
        }
        if let action { Task { await action() } }
    }
}

enum PolicyLoaderName {
    static func valid(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 32 && !name.hasPrefix("-")
            && name.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x7A) || $0 == 0x2D || $0 == 0x5F }
    }
}
