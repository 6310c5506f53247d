import Foundation
import Testing

/// Running as a service: sd_notify messages (READY=1 only once the rules are in, RELOADING=1
/// around SIGHUP, STOPPING=1), the systemd unit (systemd-analyze verify), and the libvirt
/// hook. Root only; CI runs as root.
@Suite("Running as a service", .serialized, .enabled(if: isRoot, "needs root for namespaces"))
struct ServiceEndToEndTests {
    static let policy = """
        version: 1
        name: service
        secrets:
          - env: TOKEN
            value: "e2e-real-token-0001"
            allow_hosts: [api.example.test]
        network:
          dns: [198.51.100.53]
        """

    @Test func theServiceManagerHearsReadyReloadingAndStopping() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let socket = harness.directory + "/notify.sock"
        let log = harness.directory + "/notify.log"
        // A stand-in for systemd: receives the datagrams; on READY=1 it records whether the
        // appliance's nft table is there at that moment.
        let receiver = """
            import socket, subprocess, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(sys.argv[1])
            print("ready", flush=True)
            while True:
                data = s.recv(4096).decode()
                fields = dict(line.split("=", 1) for line in data.split("\\n") if "=" in line)
                note = ""
                if fields.get("READY") == "1":
                    tables = subprocess.run(["ip", "netns", "exec", sys.argv[3], "nft", "list", "tables"], capture_output=True, text=True).stdout
                    note = " rules-present" if "keyhole_" in tables else " rules-absent"
                with open(sys.argv[2], "a") as f:
                    f.write(" ".join(f"{k}={v}" for k, v in fields.items() if k != "STATUS" and k != "MONOTONIC_USEC") + note + "\\n")
            """
        try receiver.write(toFile: harness.directory + "/notify.py", atomically: true, encoding: .utf8)
        let ready = harness.directory + "/notify.ready"
        let process = try harness.spawn("/usr/bin/python3", [harness.directory + "/notify.py", socket, log, harness.applianceNamespace], stdout: ready)
        harness.processes.append(process)
        try harness.waitFor(file: ready, containing: "ready")

        try harness.startProxy(policy: Self.policy, environment: ["NOTIFY_SOCKET": socket])
        try harness.waitFor(file: log, containing: "READY=1")
        let pid = try #require(try harness.proxyPID())
        kill(pid, SIGHUP)
        try harness.waitFor(file: log, containing: "RELOADING=1")
        Thread.sleep(forTimeInterval: 0.5)
        kill(pid, SIGTERM)
        try harness.waitFor(file: log, containing: "STOPPING=1")
        let lines = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
        #expect(lines.count == 4, "\(lines)")
        #expect(lines.first?.hasPrefix("READY=1 MAINPID=") == true && lines.first?.hasSuffix("rules-present") == true, "\(lines)")
        #expect(lines.dropFirst().first?.hasPrefix("RELOADING=1") == true, "\(lines)")
        #expect(lines.dropFirst(2).first?.hasPrefix("READY=1") == true, "\(lines)")
        #expect(lines.last?.hasPrefix("STOPPING=1") == true, "\(lines)")
        #expect(lines.allSatisfy { $0.contains("MAINPID=") })
    }

    @Test func healthzFlipsTo503WhenTheRulesAreRemovedUnderKeyholesFeet() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        try harness.startProxy(policy: Self.policy)
        func healthz() throws -> (code: String, body: String) {
            let out = try harness.appliance("curl -sS --max-time 5 -w '\\n%{http_code}' http://127.0.0.1:\(harness.metricsPort)/healthz").stdout
            let lines = out.split(separator: "\n", omittingEmptySubsequences: false)
            return (String(lines.last ?? ""), lines.dropLast().joined(separator: "\n"))
        }
        let healthy = try healthz()
        #expect(healthy.code == "200", "\(healthy)")
        #expect(healthy.body.contains("\(harness.guestInterface) rules: ok") && healthy.body.contains("dns-queue: ok") && healthy.body.contains("listener: ok"))
        // Someone flushes Keyhole's table.
        let table = "keyhole_" + harness.guestInterface.replacingOccurrences(of: "-", with: "_")
        let removed = try harness.appliance("nft delete table inet \(table) || nft list tables")
        #expect(removed.status == 0, "\(removed.stdout) \(removed.stderr)")
        let broken = try healthz()
        #expect(broken.code == "503", "\(broken)")
        #expect(broken.body.contains("\(harness.guestInterface) rules: FAILED"), "\(broken)")
    }

    @Test func sigusr1ReopensTheAuditLogAndSyslogIsASink() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        _ = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let policy = """
            version: 1
            name: logs
            secrets:
              - env: TOKEN
                value: "e2e-real-token-0001"
                allow_hosts: [api.example.test]
            network:
              on_secret_violation: block-and-log
              upstream_ca: [{{DIR}}/upca.pem]
            """
        try harness.startProxy(policy: policy)
        _ = try harness.curl("https://api.example.test/one", "-H 'Authorization: Bearer $MSB_TOKEN'")
        try harness.waitFor(file: harness.auditLog, containing: "/one")
        // logrotate: move the file away, then SIGUSR1.
        try FileManager.default.moveItem(atPath: harness.auditLog, toPath: harness.auditLog + ".1")
        let pid = try #require(try harness.proxyPID())
        kill(pid, SIGUSR1)
        Thread.sleep(forTimeInterval: 0.5)
        _ = try harness.curl("https://api.example.test/two", "-H 'Authorization: Bearer $MSB_TOKEN'")
        try harness.waitFor(file: harness.auditLog, containing: "/two")
        let rotated = (try? String(contentsOfFile: harness.auditLog + ".1", encoding: .utf8)) ?? ""
        #expect(rotated.contains("/one") && !rotated.contains("/two"))
        #expect(!harness.audit.contains("/one"))
        let attributes = try FileManager.default.attributesOfItem(atPath: harness.auditLog)
        #expect((attributes[.posixPermissions] as? Int) == 0o600)

    }

    @Test func theUnitFileVerifies() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/systemd-analyze") else { return }
        let directory = NSTemporaryDirectory() + "keyhole-unit-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // The unit as shipped, but for where the binary is here; verified as an instance.
        let unit = try String(contentsOfFile: CLI.root + "/contrib/systemd/keyhole@.service", encoding: .utf8)
            .replacingOccurrences(of: "/usr/local/bin/keyhole", with: CLI.binary)
        #expect(unit.contains("Type=notify"))
        try unit.write(toFile: directory + "/keyhole@tap0.service", atomically: true, encoding: .utf8)
        let verify = try CLI.shell("systemd-analyze verify --man=no \(directory)/keyhole@tap0.service")
        #expect(verify.status == 0 && verify.stdout.isEmpty && verify.stderr.isEmpty, "\(verify.stdout)\(verify.stderr)")
        // It would catch a broken one.
        try (unit + "\n[Service]\nBogusKey=1\n").write(toFile: directory + "/keyhole@tap1.service", atomically: true, encoding: .utf8)
        #expect(!(try CLI.shell("systemd-analyze verify --man=no \(directory)/keyhole@tap1.service").stderr.isEmpty))
    }

    @Test func theLibvirtHookStartsAndStopsAUnitPerTap() throws {
        let directory = NSTemporaryDirectory() + "keyhole-hook-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory + "/config/domains", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: directory + "/bin", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try "version: 1\n".write(toFile: directory + "/config/domains/worker.yaml", atomically: true, encoding: .utf8)
        // systemctl stand-in: records what it is asked.
        try "#!/bin/sh\necho \"$@\" >> \(directory)/systemctl.log\n".write(toFile: directory + "/bin/systemctl", atomically: true, encoding: .utf8)
        chmod(directory + "/bin/systemctl", 0o755)
        let xml = "<domain><name>worker</name><devices><disk type='file'><target dev='vda' bus='virtio'/></disk>"
            + "<interface type='network'><target dev='kh-worker0'/></interface></devices></domain>"
        try xml.write(toFile: directory + "/domain.xml", atomically: true, encoding: .utf8)
        let hook = CLI.root + "/contrib/libvirt/qemu-hook"
        let env = "PATH=\(directory)/bin:$PATH KEYHOLE_CONFIG_DIR=\(directory)/config"
        #expect(try CLI.shell("\(env) sh \(hook) worker started begin - < \(directory)/domain.xml").status == 0)
        #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: directory + "/config/kh-worker0.yaml")) == directory + "/config/domains/worker.yaml")
        #expect(try CLI.shell("\(env) sh \(hook) worker stopped end - < \(directory)/domain.xml").status == 0)
        #expect(!FileManager.default.fileExists(atPath: directory + "/config/kh-worker0.yaml"))
        // A domain without a policy is left alone.
        #expect(try CLI.shell("\(env) sh \(hook) other started begin - < \(directory)/domain.xml").status == 0)
        let calls = (try? String(contentsOfFile: directory + "/systemctl.log", encoding: .utf8)) ?? ""
        #expect(calls == "start keyhole@kh-worker0.service\nstop keyhole@kh-worker0.service\n", "\(calls)")
    }
}
