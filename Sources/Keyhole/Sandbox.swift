import Foundation
import KeyholePolicy
import KeyholeLauncher
import KeyholeProxy
import Synchronization

/// A guest VM behind Keyhole: every TCP flow through the proxy, DNS observed, egress
/// rules; the guest holds each secret's placeholder, never its value. Made by
/// `Sandbox.builder(_:)…create()`; end it with `stop()`.
///
/// A sandbox of the builtin image stays up and runs commands (`run`), each with the
/// sandbox's environment; files a command writes are there for the next one.
public final class Sandbox: Sendable {
    /// The sandbox's name (its TAP, rules and state are named after it).
    public let name: String
    /// Each secret's guest environment variable and the placeholder it holds.
    public let placeholders: [String: String]
    /// Audit events as they happen (substitutions, violations, maskings, …): one consumer;
    /// the newest 10,000 are kept while nobody reads. Ends when the sandbox stops.
    public let auditEvents: AsyncStream<AuditEvent>

    let policy: Policy
    let launcher: Launcher
    let launch: Task<Launcher.Outcome, any Error>
    let outcome: LaunchRecord
    let agent: GuestAgentSession?
    let auditContinuation: AsyncStream<AuditEvent>.Continuation

    private init(
        policy: Policy, launcher: Launcher, launch: Task<Launcher.Outcome, any Error>, outcome: LaunchRecord, agent: GuestAgentSession?,
        audit: (AsyncStream<AuditEvent>, AsyncStream<AuditEvent>.Continuation)
    ) {
        name = policy.name
        placeholders = Dictionary(policy.secrets.map { ($0.env, $0.placeholder) }, uniquingKeysWith: { a, _ in a })
        self.policy = policy
        self.launcher = launcher
        self.launch = launch
        self.outcome = outcome
        self.agent = agent
        (auditEvents, auditContinuation) = audit
    }

    /// Starts building a sandbox named `name` (letters, digits, `-`, `_`; at most 32).
    public static func builder(_ name: String) -> SandboxBuilder { SandboxBuilder(name: name) }

    static func start(
        policy: Policy, image: SandboxImage, stateDirectory: String, audit: AuditDestination, progress: (@Sendable (String) -> Void)?
    ) async throws -> Sandbox {
        guard geteuid() == 0 else { throw SandboxError.needsRoot }
        let (log, events) = try AuditDestination.open(audit)
        let socket = image == .builtin ? Launcher.agentSocketPath(stateDirectory: stateDirectory, sandbox: policy.name) : nil
        let record = LaunchRecord()
        let launcher = Launcher(
            policy: policy, stateDirectory: stateDirectory, command: nil, agentSocket: socket, audit: log,
            progress: { line in
                record.note(line)
                progress?(line)
            })
        let launch = Task { try await record.finish(launcher.run) }
        let agent = socket.map { _ in GuestAgentSession() }
        if let socket, let agent {
            do {
                try await waitUntilReady(agent, socket: socket, record: record)
            } catch {
                launcher.stop(signal: SIGTERM)
                _ = try? await launch.value
                events.continuation.finish()
                throw error
            }
        }
        return Sandbox(policy: policy, launcher: launcher, launch: launch, outcome: record, agent: agent, audit: events)
    }

    /// Connects to the agent's socket once QEMU has made it, again after a QEMU restart
    /// (KVM → TCG), until the agent answers; fails when the launch ends first.
    private static func waitUntilReady(_ agent: GuestAgentSession, socket: String, record: LaunchRecord) async throws {
        let deadline = ContinuousClock.now + .seconds(600)
        while !agent.isReady {
            if let ended = record.result {
                throw SandboxError.startFailed(record.explain(ended))
            }
            if let failure = agent.failure { throw failure }
            try Task.checkCancellation()
            if ContinuousClock.now > deadline { throw SandboxError.startFailed("the guest's command agent did not answer within 600 s") }
            if !agent.isOpen && FileManager.default.fileExists(atPath: socket) { try? await agent.connect(path: socket) }
            try await Task.sleep(for: .milliseconds(50))
        }
    }

    /// Runs `command` (an argv; no shell unless you ask for one) in the guest and returns
    /// its exit status and output. `environment` adds to the sandbox's; `onOutput` sees the
    /// output as it arrives (on an event loop: keep it short); at most `maxOutputBytes` of
    /// each stream are kept in the result. After `timeout`, the command's process group
    /// is killed (`timedOut`). A command that holds a secret's real value is refused: the
    /// guest must see only placeholders.
    public func run(
        _ command: [String], environment: [String: String] = [:], workingDirectory: String? = nil, timeout: Duration? = nil,
        maxOutputBytes: Int = 16 << 20, onOutput: (@Sendable (RunOutput) -> Void)? = nil
    ) async throws -> RunResult {
        guard let agent else { throw SandboxError.noAgent }
        guard !command.isEmpty else { throw SandboxError.invalidConfiguration(["run needs a command (an argv such as [\"sh\", \"-c\", \"…\"])"]) }
        let sent = command + environment.keys + environment.values + (workingDirectory.map { [$0] } ?? [])
        for secret in policy.secrets where sent.contains(where: secret.value.occurs(in:)) {
            throw SandboxError.valueInCommand(secret.env)
        }
        do {
            return try await agent.run(
                command, environment: environment, workingDirectory: workingDirectory, timeout: timeout, limit: max(0, maxOutputBytes),
                onOutput: onOutput)
        } catch SandboxError.stopped {
            // The guest went away under the command: say why, when the launch tells.
            for _ in 0..<100 where outcome.result == nil { try? await Task.sleep(for: .milliseconds(50)) }
            if case .success(.terminated(let reason))? = outcome.result { throw SandboxError.terminated(reason) }
            throw SandboxError.stopped
        }
    }

    /// `run(["sh", "-c", script])`.
    public func shell(_ script: String, timeout: Duration? = nil) async throws -> RunResult {
        try await run(["sh", "-c", script], timeout: timeout)
    }

    /// `run([program] + arguments)`.
    public func run(_ program: String, _ arguments: [String], timeout: Duration? = nil) async throws -> RunResult {
        try await run([program] + arguments, timeout: timeout)
    }

    /// A command line for the guest's shell: `run(["sh", "-c", commandLine])`.
    public func run(_ commandLine: String, timeout: Duration? = nil) async throws -> RunResult {
        try await shell(commandLine, timeout: timeout)
    }

    /// Shuts the guest down and removes its TAP, rules and run files. Safe to call twice.
    public func stop() async {
        launcher.stop(signal: SIGTERM)
        _ = try? await launch.value
        await agent?.close()
        auditContinuation.finish()
    }

    /// How the sandbox ended, once it has: `nil` while it runs.
    public var terminationReason: String? {
        guard let result = outcome.result else { return nil }
        if case .success(.terminated(let reason)) = result { return reason }
        return outcome.explain(result)
    }
}

/// The launch's end, and its last progress lines for error messages.
final class LaunchRecord: Sendable {
    private struct State {
        var lines: [String] = []
        var result: Result<Launcher.Outcome, any Error>?
    }
    private let state = Mutex(State())

    var result: Result<Launcher.Outcome, any Error>? { state.withLock { $0.result } }

    func note(_ line: String) {
        state.withLock { state in
            state.lines.append(line)
            if state.lines.count > 12 { state.lines.removeFirst() }
        }
    }

    func finish(_ body: () async throws -> Launcher.Outcome) async throws -> Launcher.Outcome {
        let result: Result<Launcher.Outcome, any Error>
        do {
            result = .success(try await body())
        } catch {
            result = .failure(error)
        }
        state.withLock { $0.result = result }
        return try result.get()
    }

    func explain(_ result: Result<Launcher.Outcome, any Error>) -> String {
        let reason: String
        switch result {
        case .failure(let error): reason = "\(error)"
        case .success(.exited(let status)): reason = "the guest stopped (status \(status))"
        case .success(.terminated(let why)): reason = "block-and-terminate: \(why)"
        case .success(.interrupted): reason = "stopped"
        }
        let lines = state.withLock { $0.lines }
        return ([reason] + lines.map { "  | " + $0 }).joined(separator: "\n")
    }
}

/// One audit event, as the audit log writes it (never a secret's value).
public struct AuditEvent: Sendable, Hashable {
    public enum Level: String, Sendable, Hashable {
        case info, warn, error
    }

    public var level: Level
    /// `substituted`, `violation`, `masked`, `passed-through`, `framing-error`, …
    public var event: String
    public var sandbox: String
    /// The secret's env name.
    public var secret: String?
    public var site: String?
    public var form: String?
    public var reason: String?
    public var action: String?
    public var sni: String?
    public var host: String?
    public var destination: String?
    public var method: String?
    /// The request path, without its query.
    public var path: String?
    public var detail: String?
    /// The whole event as the audit log's JSON line.
    public var jsonLine: String

    init(_ record: AuditRecord) {
        level = Level(rawValue: record.level.rawValue) ?? .info
        event = record.event
        sandbox = record.sandbox
        secret = record.secret
        site = record.site
        form = record.form
        reason = record.reason
        action = record.action
        sni = record.sni
        host = record.host
        destination = record.destination
        method = record.method
        path = record.path
        detail = record.detail
        jsonLine = record.jsonLine()
    }
}

extension AuditDestination {
    /// The audit log of a sandbox or appliance, and the stream of its events (the newest
    /// 10,000 kept while nobody reads).
    static func open(
        _ destination: AuditDestination
    ) throws -> (log: AuditLog, events: (stream: AsyncStream<AuditEvent>, continuation: AsyncStream<AuditEvent>.Continuation)) {
        let log: AuditLog
        switch destination {
        case .standardError: log = AuditLog()
        case .file(let path): log = try AuditLog(path: path)
        case .none: log = AuditLog.discarding()
        }
        let events = AsyncStream.makeStream(of: AuditEvent.self, bufferingPolicy: .bufferingNewest(10_000))
        log.addObserver { [continuation = events.continuation] record in continuation.yield(AuditEvent(record)) }
        return (log, events)
    }
}
