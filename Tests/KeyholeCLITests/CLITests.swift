import Foundation
import Testing

/// Runs the built `keyhole` binary as a user would.
enum CLI {
    static let binary: String = {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        // The test bundle may sit inside `X.xctest/` or beside the products.
        while !FileManager.default.isExecutableFile(atPath: dir.appendingPathComponent("keyhole").path), dir.path != "/" {
            dir.deleteLastPathComponent()
        }
        return dir.appendingPathComponent("keyhole").path
    }()

    static let root: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()

    struct Result {
        var status: Int32
        var stdout: String
        var stderr: String
        var stdoutBytes = Data()
        var all: String { stdout + stderr }
    }

    static func run(_ arguments: [String], cwd: String? = nil, environment: [String: String] = [:], stdin: Data? = nil) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        if let cwd { process.currentDirectoryURL = URL(fileURLWithPath: cwd) }
        var env = ProcessInfo.processInfo.environment
        env["KEYHOLE_FIXTURE_UNSET_VARIABLE"] = nil
        for (key, value) in environment { env[key] = value }
        process.environment = env
        let input = Pipe()
        process.standardInput = input
        return try collect(process) {
            if let stdin { input.fileHandleForWriting.write(stdin) }
            try input.fileHandleForWriting.close()
        }
    }

    /// Runs a shell command line (`sh -c`), collecting status and output.
    static func shell(_ command: String) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command]
        process.standardInput = FileHandle.nullDevice
        return try collect(process)
    }

    /// Runs `process` (its stdin already set), calls `afterStart`, and collects its exit
    /// status and both output streams.
    static func collect(_ process: Process, afterStart: () throws -> Void = {}) throws -> Result {
        let out = Pipe()
        let err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        try afterStart()
        // Read both pipes concurrently so a chatty child cannot block on a full pipe.
        nonisolated(unsafe) var errData = Data()
        let reader = Thread { errData = err.fileHandleForReading.readDataToEndOfFile() }
        reader.start()
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        while reader.isExecuting { usleep(1000) }
        return Result(
            status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
            stderr: String(decoding: errData, as: UTF8.self), stdoutBytes: outData)
    }
}

let exampleEnvironment = [
    "GITHUB_TOKEN": "ghp_cliExample000000000000000000000000",
    "OPENAI_API_KEY": "sk-cli-example-0000000000",
    "MAPS_API_KEY": "maps-cli-example-key",
    "DEMO_API_TOKEN": "demo-cli-real-token",
]

@Suite("keyhole CLI")
struct CLITests {
    @Test func policyCheckAcceptsEveryExampleAndNeverPrintsValues() throws {
        let policies = try FileManager.default.contentsOfDirectory(atPath: CLI.root + "/policies")
            .filter { $0.hasSuffix(".yaml") }.sorted().map { "policies/" + $0 }
        #expect(policies.count >= 4)
        let result = try CLI.run(["policy", "check", "--verbose"] + policies, cwd: CLI.root, environment: exampleEnvironment)
        #expect(result.status == 0, "\(result.all)")
        for file in policies { #expect(result.stdout.contains("\(file): ok")) }
        #expect(result.stdout.contains("<redacted>"))
        for value in exampleEnvironment.values + ["registry-demo-password"] {
            #expect(!result.all.contains(value), "a real value was printed")
        }
    }

    @Test func policyCheckRejectsEachInvalidFixtureWithItsExactMessages() throws {
        let dir = CLI.root + "/Tests/KeyholePolicyTests/Fixtures/invalid"
        let fixtures = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".yaml") }.sorted()
        #expect(fixtures.count >= 10)
        for fixture in fixtures {
            let expected = try String(contentsOfFile: dir + "/" + fixture.replacingOccurrences(of: ".yaml", with: ".expected"), encoding: .utf8)
            let result = try CLI.run(["policy", "check", "-v", fixture], cwd: dir, environment: ["HOME": "/root"])
            #expect(result.status == 1, "\(fixture)")
            #expect(result.stderr == expected, "\(fixture)")
            #expect(!result.all.contains("fixture-secret"), "\(fixture) printed a secret value")
        }
    }

    @Test func policyCheckReportsAllFilesAndFailsIfAnyIsInvalid() throws {
        let result = try CLI.run(
            ["policy", "check", "policies/github.yaml", "Tests/KeyholePolicyTests/Fixtures/invalid/bad-version.yaml"],
            cwd: CLI.root, environment: exampleEnvironment)
        #expect(result.status == 1)
        #expect(result.stdout.contains("policies/github.yaml: ok"))
        #expect(result.stderr.contains("bad-version.yaml:1:10: unsupported policy version 2"))
    }

    @Test func missingPolicyFileIsAClearError() throws {
        let result = try CLI.run(["policy", "check", "/nonexistent/policy.yaml"])
        #expect(result.status == 1)
        #expect(result.stderr == "/nonexistent/policy.yaml:1:1: cannot read the policy file: No such file or directory\n")
    }

    @Test func caInitTwiceKeepsTheSameCAWithAPrivateKey() throws {
        let state = "/tmp/keyhole-cli-ca-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: state) }
        let first = try CLI.run(["ca", "init", "--state-dir", state])
        #expect(first.status == 0, "\(first.all)")
        #expect(first.stdout.contains("created sandbox CA"))
        let pem1 = try CLI.run(["ca", "show", "--state-dir", state])
        let second = try CLI.run(["ca", "init", "--state-dir", state])
        #expect(second.stdout.contains("already exists"))
        let pem2 = try CLI.run(["ca", "show", "--state-dir", state])
        #expect(pem1.status == 0 && pem1.stdout.hasPrefix("-----BEGIN CERTIFICATE-----"))
        #expect(pem1.stdout == pem2.stdout)
        let attributes = try FileManager.default.attributesOfItem(atPath: state + "/ca.key")
        #expect((attributes[.posixPermissions] as? Int) == 0o600)
        for output in [first, second, pem1, pem2] {
            #expect(!output.all.contains("PRIVATE KEY"))
        }
    }

    @Test func caShowWithoutInitFails() throws {
        let result = try CLI.run(["ca", "show", "--state-dir", "/tmp/keyhole-cli-none-\(UUID().uuidString)"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("keyhole ca init"))
    }

    @Test func helpAndVersion() throws {
        let version = try CLI.run(["--version"])
        #expect(version.status == 0)
        #expect(version.stdout.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ".").count == 3)
        for command in [[], ["policy"], ["policy", "check"], ["ca"], ["ca", "init"], ["ca", "show"], ["rewrite"], ["proxy"], ["run"]] {
            let help = try CLI.run(command + ["--help"])
            #expect(help.status == 0, "\(command)")
            #expect(help.stdout.contains("USAGE"), "\(command)")
        }
    }
}

@Suite("keyhole rewrite")
struct RewriteCLITests {
    static let policy: String = {
        let path = "/tmp/keyhole-rewrite-cli-\(getpid()).yaml"
        let yaml = """
            version: 1
            name: cli
            secrets:
              - env: TOKEN
                value: "cli-real-value"
                allow_hosts: [api.example.com]
                inject: { body: true }
            network:
              on_secret_violation: block-and-log
            """
        _ = FileManager.default.createFile(atPath: path, contents: Data(yaml.utf8))
        return path
    }()

    let stream = Data(
        ("GET /a HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer $MSB_TOKEN\r\n\r\n"
            + "POST /b?secretquery=1 HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n$MSB\r\n6\r\n_TOKEN\r\n0\r\n\r\n").utf8)

    @Test func rewritesAndIsIndependentOfChunkSize() throws {
        let reference = try CLI.run(["rewrite", "--policy", Self.policy, "--sni", "api.example.com"], stdin: stream)
        #expect(reference.status == 0, "\(reference.stderr)")
        #expect(reference.stdout.contains("Authorization: Bearer cli-real-value\r\n"))
        #expect(reference.stdout.contains("E\r\ncli-real-value\r\n0\r\n\r\n"))
        for size in ["1", "2", "5", "17", "4096"] {
            let run = try CLI.run(["rewrite", "--policy", Self.policy, "--sni", "api.example.com", "--chunk-size", size], stdin: stream)
            #expect(run.stdout == reference.stdout, "chunk size \(size)")
            #expect(run.stderr == reference.stderr, "chunk size \(size)")
        }
        let events = reference.stderr.split(separator: "\n")
        #expect(events.count == 2)
        #expect(events.allSatisfy { $0.contains("\"event\":\"substituted\"") && $0.contains("\"secret\":\"TOKEN\"") })
        #expect(!reference.stderr.contains("cli-real-value"))
        #expect(!reference.stderr.contains("secretquery"))
    }

    @Test func aResponseStreamIsMaskedIndependentlyOfChunkSize() throws {
        // Two requests, two responses: one quoting the value in a header and a chunked body
        // (split across chunks), one HEAD-like 204 with nothing to mask.
        let response = "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer token=\"cli-real-value\"\r\nTransfer-Encoding: chunked\r\n\r\n"
            + "7\r\necho cl\r\nC\r\ni-real-value\r\n0\r\n\r\n" + "HTTP/1.1 204 No Content\r\n\r\n"
        let path = "/tmp/keyhole-rewrite-response-\(getpid()).bin"
        let upstream = "/tmp/keyhole-rewrite-upstream-\(getpid()).bin"
        defer {
            unlink(path)
            unlink(upstream)
        }
        _ = FileManager.default.createFile(atPath: path, contents: Data(response.utf8))
        let arguments = ["rewrite", "--policy", Self.policy, "--sni", "api.example.com", "--response", path]
        let reference = try CLI.run(arguments + ["--upstream-output", upstream], stdin: stream)
        #expect(reference.status == 0, "\(reference.stderr)")
        #expect(reference.stdout == "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer token=\"$MSB_TOKEN\"\r\nTransfer-Encoding: chunked\r\n\r\n"
            + "7\r\necho $M\r\nC\r\nSB_TOKEN****\r\n0\r\n\r\n" + "HTTP/1.1 204 No Content\r\n\r\n")
        #expect(reference.stderr.contains("\"event\":\"masked\",\"secret\":\"TOKEN\",\"site\":\"response-head\""))
        #expect(reference.stderr.contains("\"site\":\"response-body\""))
        #expect(!reference.stderr.contains("cli-real-value"))
        // The upstream got the value, and was asked for identity responses.
        let sent = try String(contentsOfFile: upstream, encoding: .utf8)
        #expect(sent.contains("Authorization: Bearer cli-real-value\r\n") && sent.contains("Accept-Encoding: identity\r\n"))
        for size in ["1", "3", "11"] {
            let run = try CLI.run(arguments + ["--chunk-size", size], stdin: stream)
            #expect(run.stdout == reference.stdout, "chunk size \(size)")
        }
    }

    @Test func blockedExitsThreeWithAnAuditEvent() throws {
        let fronted = Data("GET / HTTP/1.1\r\nHost: evil.example.net\r\nX: $MSB_TOKEN\r\n\r\n".utf8)
        let run = try CLI.run(["rewrite", "--policy", Self.policy, "--sni", "api.example.com"], stdin: fronted)
        #expect(run.status == 3)
        #expect(run.stdout.isEmpty)
        #expect(run.stderr.contains("\"event\":\"violation\""))
        #expect(run.stderr.contains("\"reason\":\"host-header-mismatch\""))
        #expect(run.stderr.contains("\"action\":\"block-and-log\""))
    }

    @Test func identityAndPlainFlags() throws {
        let request = Data("GET / HTTP/1.1\r\nHost: api.example.com\r\nX: $MSB_TOKEN\r\n\r\n".utf8)
        let unverified = try CLI.run(["rewrite", "--policy", Self.policy, "--sni", "api.example.com", "--identity", "unverified"], stdin: request)
        #expect(unverified.status == 3)
        #expect(unverified.stderr.contains("upstream-unverified"))
        let plain = try CLI.run(["rewrite", "--policy", Self.policy, "--sni", "api.example.com", "--plain"], stdin: request)
        #expect(plain.status == 3)
        #expect(plain.stderr.contains("tls-identity-required"))
        let unpinned = try CLI.run(["rewrite", "--policy", Self.policy, "--sni", "api.example.com", "--no-dns-pin"], stdin: request)
        #expect(unpinned.status == 3)
        #expect(unpinned.stderr.contains("dns-not-pinned"))
    }

    @Test func framingErrorsExitThree() throws {
        let smuggle = Data("POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n".utf8)
        let run = try CLI.run(["rewrite", "--policy", Self.policy, "--sni", "api.example.com"], stdin: smuggle)
        #expect(run.status == 3)
        #expect(run.stderr.contains("content-length-with-transfer-encoding"))
    }

    @Test func usageAndPolicyErrorsExitTwo() throws {
        let missing = try CLI.run(["rewrite", "--sni", "api.example.com"], stdin: Data())
        #expect(missing.status == 2)
        #expect(missing.stderr.contains("--policy"))
        let badChunk = try CLI.run(["rewrite", "--policy", Self.policy, "--sni", "a.example.com", "--chunk-size", "0"], stdin: Data())
        #expect(badChunk.status == 2)
        let badPolicy = try CLI.run(["rewrite", "--policy", "/nonexistent.yaml", "--sni", "a.example.com"], stdin: Data())
        #expect(badPolicy.status == 2)
        #expect(badPolicy.stderr.contains("/nonexistent.yaml:1:1:"))
    }
}

@Suite("keyhole run and keyhole proxy: usage errors")
struct LaunchUsageTests {
    @Test func runWithABadPolicyPointsAtTheFile() throws {
        let run = try CLI.run(["run", "/nonexistent.yaml", "--", "true"])
        #expect(run.status == 2)
        #expect(run.stderr.contains("/nonexistent.yaml:1:1:"))
    }

    @Test(arguments: [
        (["proxy", "--policy", "a.yaml", "--interface", "x0", "--interface", "x1"], "one --policy per --interface"),
        (["proxy", "--policy", "a.yaml", "--interface", "x0", "--interface", "x0", "--policy", "b.yaml"], "once"),
        (["proxy", "--policy", "a.yaml", "--listen", "127.0.0.1:1", "--interface", "x0"], "exclude each other"),
        (["proxy", "--policy", "a.yaml", "--interface", "x0", "--pin", "a.test=203.0.113.1"], "--pin is for --listen"),
    ])
    func proxyRejectsInconsistentInterfaces(_ arguments: [String], _ message: String) throws {
        let run = try CLI.run(arguments)
        #expect(run.status == 2)
        #expect(run.stderr.contains(message), "\(run.stderr)")
    }
}

@Suite("keyhole rewrite on the engine corpus")
struct RewriteCorpusCLITests {
    static let directory = CLI.root + "/Tests/KeyholeEngineTests/Fixtures/corpus"
    static let cases: [String] = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [])
        .filter { $0.hasSuffix(".http") }.map { String($0.dropLast(5)) }.sorted()

    @Test(arguments: cases)
    func outputIsIdenticalForChunkSizes1And7And65536(_ name: String) throws {
        let dir = Self.directory
        let input = try Data(contentsOf: URL(fileURLWithPath: "\(dir)/\(name).http"))
        let expectedOut = try Data(contentsOf: URL(fileURLWithPath: "\(dir)/\(name).out"))
        let expectedEvents = try String(contentsOfFile: "\(dir)/\(name).events", encoding: .utf8)
        let args = try String(contentsOfFile: "\(dir)/\(name).args", encoding: .utf8).split(whereSeparator: \.isWhitespace).map(String.init)
        let blocked = expectedEvents.contains("\"event\":\"violation\"") || expectedEvents.contains("\"event\":\"framing-error\"")
        for size in ["1", "7", "65536"] {
            let run = try CLI.run(["rewrite", "--policy", "policy.yaml"] + args + ["--chunk-size", size], cwd: dir, stdin: input)
            #expect(run.status == (blocked ? 3 : 0), "\(name) chunk \(size)")
            #expect(run.stdoutBytes == expectedOut, "\(name) chunk \(size)")
            #expect(run.stderr == expectedEvents, "\(name) chunk \(size)")
            for value in ["corpus-real-token", "corpus-other-value", "corpus-plain-value"] {
                #expect(!run.stderr.contains(value))
            }
        }
    }
}

@Suite("keyhole proxy usage")
struct ProxyUsageTests {
    @Test(arguments: [
        (["proxy", "--policy", "p.yaml"], "--interface IFACE"),
        (["proxy", "--policy", "p.yaml", "--interface", "bad name"], "may contain only"),
        (["proxy", "--policy", "p.yaml", "--listen", "127.0.0.1:1", "--pin", "nonsense"], "must be NAME=IP"),
        (["proxy", "--policy", "p.yaml", "--listen", "127.0.0.1:1", "--idle-timeout", "0"], "--idle-timeout must be more than 0"),
    ])
    func usageErrorsExitTwo(_ arguments: [String], _ message: String) throws {
        let run = try CLI.run(arguments)
        #expect(run.status == 2)
        #expect(run.stderr.contains(message), "\(run.stderr)")
    }

    @Test func aMissingInterfaceIsAClearError() throws {
        let policy = CLI.root + "/policies/github.yaml"
        let state = "/tmp/keyhole-cli-iface-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: state) }
        let run = try CLI.run(
            ["proxy", "--policy", policy, "--interface", "khnosuch0", "--state-dir", state, "--proxy-port", "0"],
            environment: exampleEnvironment)
        #expect(run.status == 1)
        #expect(run.stderr.contains("interface khnosuch0: does not exist"), "\(run.stderr)")
    }
}
