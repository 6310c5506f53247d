import Foundation
import KeyholeLauncher
import Synchronization
import Testing

@testable import Keyhole

/// The host side of the guest's command agent against the real agent script, run here on
/// a Unix socket instead of a virtio console (`--listen`), and against a hostile "guest".
@Suite("Guest agent")
struct GuestAgentTests {
    final class Agent {
        let directory: String
        let socket: String
        let process: Process

        /// A stand-in guest: `body` runs once the host has connected to the socket and the
        /// stand-in has said it is ready (`conn` is the connection).
        static func fake(_ body: String) throws -> Agent {
            let script = """
                import socket, sys, time
                server = socket.socket(socket.AF_UNIX)
                server.bind(sys.argv[1])
                server.listen(1)
                conn = server.accept()[0]
                conn.sendall(b'{"t":"ready"}\\n')

                """ + body
            return try Agent(script: script, fake: true)
        }

        init(script: String = GuestAgentScript.source, fake: Bool = false) throws {
            directory = NSTemporaryDirectory() + "kh-agent-" + UUID().uuidString.prefix(8)
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            socket = directory + "/agent.sock"
            try script.write(toFile: directory + "/agent.py", atomically: true, encoding: .utf8)
            process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
            process.arguments = [directory + "/agent.py"] + (fake ? [socket] : ["--listen", socket])
            process.standardError = FileHandle(forWritingAtPath: "/dev/null")
            try process.run()
        }

        func connected() async throws -> GuestAgentSession {
            let session = GuestAgentSession()
            for _ in 0..<200 where !FileManager.default.fileExists(atPath: socket) { try await Task.sleep(for: .milliseconds(25)) }
            try await session.connect(path: socket)
            for _ in 0..<200 where !session.isReady && session.failure == nil { try await Task.sleep(for: .milliseconds(25)) }
            return session
        }

        func close() {
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
            try? FileManager.default.removeItem(atPath: directory)
        }
    }

    func run(_ session: GuestAgentSession, _ argv: [String], timeout: Duration? = nil, limit: Int = 1 << 20, onOutput: (@Sendable (RunOutput) -> Void)? = nil)
        async throws -> RunResult
    {
        try await session.run(argv, environment: ["EXTRA": "x"], workingDirectory: "/", timeout: timeout, limit: limit, onOutput: onOutput)
    }

    @Test func commandsRunWithTheirOutputStatusAndEnvironment() async throws {
        let agent = try Agent()
        defer { agent.close() }
        let session = try await agent.connected()
        #expect(session.isReady)
        let chunks = Chunks()
        let result = try await run(session, ["sh", "-c", "echo out-$EXTRA; pwd; echo err >&2; exit 3"], onOutput: { chunks.add($0) })
        #expect(result.exitCode == 3)
        #expect(result.stdout == "out-x\n/\n")
        #expect(result.stderr == "err\n")
        #expect(chunks.all.contains(.stderr(Array("err\n".utf8))))
        // Several at once, each with its own output.
        async let a = run(session, ["sh", "-c", "sleep 0.3; echo a"])
        async let b = run(session, ["sh", "-c", "echo b"])
        let (ra, rb) = try await (a, b)
        #expect(ra.stdout == "a\n" && rb.stdout == "b\n")
        // Not found; binary output; signals.
        let missing = try await run(session, ["/no/such/program"])
        #expect(missing.exitCode == 127 && missing.startError != nil)
        let binary = try await run(session, ["sh", "-c", "printf '\\000\\377\\n'"])
        #expect(binary.stdoutBytes == [0, 0xFF, 0x0A])
        let killed = try await run(session, ["sh", "-c", "kill -TERM $$"])
        #expect(killed.exitCode == 128 + 15)
    }

    @Test func aTimeoutKillsTheCommandAndOutputBeyondTheLimitIsDropped() async throws {
        let agent = try Agent()
        defer { agent.close() }
        let session = try await agent.connected()
        let slow = try await run(session, ["sh", "-c", "echo started; sleep 30; echo never"], timeout: .milliseconds(500))
        #expect(slow.timedOut && slow.exitCode == 128 + 9)
        #expect(slow.stdout == "started\n")
        let flood = try await run(session, ["head", "-c", "300000", "/dev/zero"], limit: 1000)
        #expect(flood.exitCode == 0 && flood.stdoutBytes.count == 1000 && flood.stdoutTruncated)
    }

    /// A guest that ignores the kill after a timeout does not hold the caller.
    @Test func aGuestThatNeverReportsTheEndOfATimedOutRunDoesNotHoldTheCaller() async throws {
        let agent = try Agent.fake("time.sleep(300)\n")
        defer { agent.close() }
        let session = try await agent.connected()
        // Without the grace, this would wait until the guest hangs up (300 s) and then fail.
        let result = try await run(session, ["sleep", "100"], timeout: .milliseconds(200))
        #expect(result.timedOut && result.exitCode == 128 + 9)
    }

    /// A hostile guest: what it sends is input, never trusted. An over-long line, or one that
    /// is not the protocol, fails every run and closes the connection.
    @Test(arguments: [
        ("a line over 1 MiB", "conn.sendall(b'{\"t\":\"out\",\"id\":1,\"fd\":1,\"data\":\"' + b'A' * (2 << 20))"),
        ("not JSON", "conn.sendall(b'\\x00garbage\\n')"),
        ("an out message without data", "conn.sendall(b'{\"t\":\"out\",\"id\":1,\"fd\":1}\\n')"),
        ("an output stream that is neither 1 nor 2", "conn.sendall(b'{\"t\":\"out\",\"id\":1,\"fd\":7,\"data\":\"\"}\\n')"),
    ])
    func aGuestThatBreaksTheProtocolFailsClosed(_ attack: (String, String)) async throws {
        let agent = try Agent.fake(
            """
            conn.recv(65536)
            time.sleep(0.2)
            \(attack.1)
            time.sleep(5)

            """)
        defer { agent.close() }
        let session = try await agent.connected()
        await #expect(throws: SandboxError.self, "\(attack.0)") { try await run(session, ["true"]) }
        guard case .agentProtocol? = session.failure else {
            Issue.record("\(attack.0): \(String(describing: session.failure))")
            return
        }
        for _ in 0..<100 where session.isOpen { try await Task.sleep(for: .milliseconds(20)) }
        #expect(!session.isOpen)
        await #expect(throws: SandboxError.self) { try await run(session, ["true"]) }
    }
}

final class Chunks: Sendable {
    private let state = Mutex<[RunOutput]>([])
    func add(_ output: RunOutput) { state.withLock { $0.append(output) } }
    var all: [RunOutput] { state.withLock { $0 } }
}


