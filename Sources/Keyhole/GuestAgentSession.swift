import Foundation
import NIOCore
import NIOPosix
import Synchronization

/// Output of a running command, as it arrives.
public enum RunOutput: Sendable, Hashable {
    case stdout([UInt8])
    case stderr([UInt8])
}

/// What a command did.
public struct RunResult: Sendable, Hashable {
    /// The exit status; 128 + n when signal n ended it; 127 when it was not found.
    public var exitCode: Int32
    public var stdoutBytes: [UInt8]
    public var stderrBytes: [UInt8]
    /// More output came than `maxOutputBytes`; the rest was dropped (streamed output is not).
    public var stdoutTruncated = false
    public var stderrTruncated = false
    /// The timeout passed and the command's process group was killed.
    public var timedOut = false
    /// Why the guest could not start the command, if it could not.
    public var startError: String?

    /// The same as `exitCode`.
    public var exitStatus: Int32 { exitCode }
    public var stdout: String { String(decoding: stdoutBytes, as: UTF8.self) }
    public var stderr: String { String(decoding: stderrBytes, as: UTF8.self) }
    public var succeeded: Bool { exitCode == 0 }
}

/// The host side of the guest's command agent (`GuestAgentScript`): JSON lines over the
/// Unix socket QEMU makes of the guest's virtio console. Everything the guest sends is
/// untrusted: lines are bounded, fields checked, output kept within each run's limit, and
/// a protocol breach closes the connection and fails every run.
final class GuestAgentSession: Sendable {
    struct Pending {
        var result = RunResult(exitCode: -1, stdoutBytes: [], stderrBytes: [])
        var limit: Int
        var onOutput: (@Sendable (RunOutput) -> Void)?
        var continuation: CheckedContinuation<RunResult, any Error>
    }

    struct State {
        var channel: (any Channel)?
        var ready = false
        var failure: SandboxError?
        var nextID: UInt64 = 1
        var pending: [UInt64: Pending] = [:]
    }

    private let state = Mutex(State())
    /// A line longer than this from the guest breaks the protocol (output comes in 32 KiB pieces).
    static let maxLine = 1 << 20

    var isReady: Bool { state.withLock { $0.ready } }
    var failure: SandboxError? { state.withLock { $0.failure } }
    var isOpen: Bool { state.withLock { $0.channel?.isActive ?? false } }

    /// Connects to the agent's socket and says hello; `isReady` turns true on its answer.
    func connect(path: String) async throws {
        // Reset before the connection exists: the agent's `ready` may arrive before
        // `connect` returns, and must not be forgotten.
        state.withLock { $0.ready = false }
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers([
                        ByteToMessageHandler(AgentLineDecoder()), AgentHandler(session: self),
                    ])
                }
            }
            .connect(unixDomainSocketPath: path).get()
        state.withLock { $0.channel = channel }
        try await channel.writeAndFlush(ByteBuffer(bytes: Self.line(["t": "hello"]))).get()
    }

    /// Starts `argv` in the guest and returns when it ends.
    func run(
        _ argv: [String], environment: [String: String], workingDirectory: String?, timeout: Duration?, limit: Int,
        onOutput: (@Sendable (RunOutput) -> Void)?
    ) async throws -> RunResult {
        var request: [String: Any] = ["t": "run", "argv": argv, "env": environment]
        if let workingDirectory { request["cwd"] = workingDirectory }
        let (id, channel): (UInt64, (any Channel)?) = state.withLock { state in
            defer { state.nextID += 1 }
            return (state.nextID, state.failure == nil && state.ready ? state.channel : nil)
        }
        guard let channel else { throw state.withLock { $0.failure } ?? .stopped }
        request["id"] = id
        let bytes = Self.line(request)
        // Timers on the connection's event loop: they fire however busy the caller's
        // concurrency pool is.
        let timer = timeout.map { timeout in
            channel.eventLoop.scheduleTask(in: Self.amount(timeout)) { [weak self] in self?.timedOut(id) }
        }
        defer { timer?.cancel() }
        return try await withCheckedThrowingContinuation { continuation in
            let failure: SandboxError? = state.withLock { state in
                if let failure = state.failure { return failure }
                state.pending[id] = Pending(limit: limit, onOutput: onOutput, continuation: continuation)
                return nil
            }
            if let failure {
                continuation.resume(throwing: failure)
                return
            }
            channel.writeAndFlush(ByteBuffer(bytes: bytes)).whenFailure { [self] _ in fail(.stopped) }
        }
    }

    /// The timeout: the command's process group is killed. A guest that does not report
    /// its end within `killGrace` after that does not hold the caller: the run ends as killed.
    private func timedOut(_ id: UInt64) {
        let channel: (any Channel)? = state.withLock { state in
            guard state.pending[id] != nil else { return nil }
            state.pending[id]?.result.timedOut = true
            return state.channel
        }
        guard let channel else { return }
        channel.writeAndFlush(ByteBuffer(bytes: Self.line(["t": "signal", "id": id, "sig": 9])), promise: nil)
        channel.eventLoop.scheduleTask(in: Self.amount(Self.killGrace)) { [weak self] in
            guard let self else { return }
            let pending: Pending? = self.state.withLock { $0.pending.removeValue(forKey: id) }
            guard var pending else { return }
            pending.result.exitCode = 128 + 9
            pending.continuation.resume(returning: pending.result)
        }
    }

    static let killGrace: Duration = .seconds(5)

    static func amount(_ duration: Duration) -> TimeAmount {
        let (seconds, attoseconds) = duration.components
        return .nanoseconds(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    }

    /// One line from the guest.
    func received(_ line: ByteBuffer) {
        guard let object = try? JSONSerialization.jsonObject(with: Data(line.readableBytesView)), let message = object as? [String: Any],
            let kind = message["t"] as? String
        else { return protocolError("a line that is not a JSON object with a \"t\"") }
        switch kind {
        case "ready":
            state.withLock { $0.ready = true }
        case "out":
            guard let id = (message["id"] as? NSNumber)?.uint64Value, let stream = (message["fd"] as? NSNumber)?.intValue, stream == 1 || stream == 2,
                let text = message["data"] as? String, let data = Data(base64Encoded: text)
            else { return protocolError("an output message without id, fd or base64 data") }
            let bytes = [UInt8](data)
            let output: RunOutput = stream == 1 ? .stdout(bytes) : .stderr(bytes)
            let handler: (@Sendable (RunOutput) -> Void)? = state.withLock { state in
                guard var pending = state.pending[id] else { return nil }
                if stream == 1 {
                    Self.keep(bytes, in: &pending.result.stdoutBytes, truncated: &pending.result.stdoutTruncated, limit: pending.limit)
                } else {
                    Self.keep(bytes, in: &pending.result.stderrBytes, truncated: &pending.result.stderrTruncated, limit: pending.limit)
                }
                state.pending[id] = pending
                return pending.onOutput
            }
            handler?(output)
        case "exit":
            guard let id = (message["id"] as? NSNumber)?.uint64Value, let status = (message["status"] as? NSNumber)?.int32Value else {
                return protocolError("an exit message without id or status")
            }
            let pending: Pending? = state.withLock { $0.pending.removeValue(forKey: id) }
            guard var pending else { return }
            pending.result.exitCode = status
            pending.result.startError = message["error"] as? String
            pending.continuation.resume(returning: pending.result)
        default:
            // An echo of the host's own line (before the guest's console was raw) or a newer agent.
            break
        }
    }

    private static func keep(_ bytes: [UInt8], in buffer: inout [UInt8], truncated: inout Bool, limit: Int) {
        let room = max(0, limit - buffer.count)
        if bytes.count > room { truncated = true }
        buffer += bytes.prefix(room)
    }

    func protocolError(_ reason: String) {
        fail(.agentProtocol(reason))
    }

    /// Fails every run, now and later, and closes the connection.
    func fail(_ error: SandboxError) {
        let (pending, channel): ([Pending], (any Channel)?) = state.withLock { state in
            if state.failure == nil { state.failure = error }
            defer { state.pending.removeAll() }
            return (Array(state.pending.values), state.channel)
        }
        for run in pending { run.continuation.resume(throwing: error) }
        channel?.close(promise: nil)
    }

    /// The connection ended. Before the agent was ready (QEMU restarted for a TCG retry)
    /// that is no failure: `connect` is called again.
    func closed() {
        let wasReady = state.withLock { state in
            defer { state.channel = nil }
            return state.ready
        }
        if wasReady { fail(.stopped) }
    }

    func close() async {
        fail(.stopped)
    }

    static func line(_ object: [String: Any]) -> [UInt8] {
        let data = (try? JSONSerialization.data(withJSONObject: object)) ?? Data("{}".utf8)
        return [UInt8](data) + [0x0A]
    }
}

/// Splits the guest's stream into lines of at most `GuestAgentSession.maxLine` bytes.
final class AgentLineDecoder: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer

    /// How much of the pending line has been searched for its newline already (a line
    /// dripped in small pieces is scanned once, not once a piece).
    private var scanned = 0

    func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        let view = buffer.readableBytesView
        if let newline = view[(view.startIndex + scanned)...].firstIndex(of: 0x0A) {
            scanned = 0
            let line = buffer.readSlice(length: newline - view.startIndex)!
            buffer.moveReaderIndex(forwardBy: 1)
            context.fireChannelRead(wrapInboundOut(line))
            return .continue
        }
        scanned = view.count
        if buffer.readableBytes > GuestAgentSession.maxLine { throw SandboxError.agentProtocol("a line over 1 MiB") }
        return .needMoreData
    }
}

final class AgentHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let session: GuestAgentSession

    init(session: GuestAgentSession) { self.session = session }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        session.received(unwrapInboundIn(data))
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        session.fail((error as? SandboxError) ?? .agentProtocol("\(error)"))
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        session.closed()
        context.fireChannelInactive()
    }
}

@available(*, unavailable) extension AgentHandler: Sendable {}
@available(*, unavailable) extension AgentLineDecoder: Sendable {}
