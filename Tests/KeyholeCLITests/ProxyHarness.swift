import Foundation
import Testing

let isRoot = getuid() == 0

/// A network namespace with "upstream" servers on public-looking addresses, the proxy, and
/// nft rules that REDIRECT the namespace's own TCP to it: the guest's view of the world.
/// Everything is torn down by `close()`, which every test calls in a `defer`.
final class ProxyHarness: @unchecked Sendable {
    nonisolated(unsafe) static var counter = 0
    static let lock = NSLock()

    enum Mode {
        /// One namespace: guest, proxy (--listen) and upstreams, with a REDIRECT rule.
        case redirect
        /// Three namespaces: guest ─veth─ appliance (keyhole proxy --interface) ─veth─
        /// internet (dnsmasq and the upstreams).
        case appliance
        /// Two namespaces: appliance (where `keyhole run` creates its TAP and boots the
        /// guest) ─veth─ internet; the appliance's resolver is the internet's dnsmasq.
        case launcher
    }

    let mode: Mode
    /// Where guest commands run.
    let namespace: String
    let applianceNamespace: String
    let internetNamespace: String
    let shortID: String
    let directory: String
    var processes: [Process] = []
    var proxy: Process?
    let proxyStderr: String
    let proxyStdout: String
    let auditLog: String
    let stateDirectory: String
    var metricsPort = 0
    /// Guest namespaces added with `addGuest()`.
    var extraNamespaces: [String] = []

    /// Hosts with certificates from the test upstream CA.
    static let names = ["api.example.test", "other.example.test", "pinned.example.test", "v6.example.test"]

    init(mode: Mode = .redirect) throws {
        Self.lock.lock()
        Self.counter += 1
        let n = Self.counter
        Self.lock.unlock()
        self.mode = mode
        let base = "kh-t\(getpid() % 100000)-\(n)"
        shortID = "k\(getpid() % 10000)x\(n)"
        switch mode {
        case .redirect:
            namespace = base
            applianceNamespace = base
            internetNamespace = base
        case .appliance:
            namespace = base + "-g"
            applianceNamespace = base + "-a"
            internetNamespace = base + "-i"
        case .launcher:
            namespace = base + "-a"
            applianceNamespace = base + "-a"
            internetNamespace = base + "-i"
        }
        directory = "/tmp/keyhole-e2e-\(base)"
        proxyStderr = directory + "/proxy.err"
        proxyStdout = directory + "/proxy.out"
        auditLog = directory + "/audit.log"
        stateDirectory = directory + "/state"
        Self.removeStaleNamespaces()
        try? FileManager.default.removeItem(atPath: directory)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        for ns in Set([namespace, applianceNamespace, internetNamespace]) {
            _ = try? sh("ip netns del \(ns)")
            try sh("ip netns add \(ns) && ip -n \(ns) link set lo up")
        }
        for suffix in 10...13 { try sh("ip -n \(internetNamespace) addr add 203.0.113.\(suffix)/32 dev lo") }
        try makePKI()
        switch mode {
        case .redirect:
            // The namespace's own TCP to the "internet" goes to the proxy; the proxy's sockets
            // carry mark 0x4b48 and are exempt.
            try sh(
                """
                ip netns exec \(namespace) nft -f - <<'EOF'
                table ip keyhole_test {
                  chain output {
                    type nat hook output priority -100; policy accept;
                    meta mark 0x4b48 return
                    ip daddr 203.0.113.0/24 tcp dport { 80, 443, 7000, 8443 } redirect to :15001
                  }
                }
                EOF
                """)
        case .appliance, .launcher:
            let g = namespace, a = applianceNamespace, i = internetNamespace, id = shortID
            if mode == .appliance {
                try sh(
                    """
                    ip link add \(id)-g0 netns \(g) type veth peer name \(id)-a0 netns \(a)
                    ip -n \(g) addr add 10.0.2.2/30 dev \(id)-g0 && ip -n \(g) link set \(id)-g0 up && ip -n \(g) route add default via 10.0.2.1
                    ip -n \(g) addr add fd00:2::2/64 dev \(id)-g0 nodad && ip -n \(a) addr add fd00:2::1/64 dev \(id)-a0 nodad
                    ip -n \(g) -6 route add default via fd00:2::1
                    """)
            }
            try sh(
                """
                ip link add \(id)-a1 netns \(a) type veth peer name \(id)-i1 netns \(i)
                ip -n \(a) addr add 198.51.100.1/24 dev \(id)-a1 && ip -n \(a) link set \(id)-a1 up
                ip -n \(a) route add 203.0.113.0/24 via 198.51.100.2 && ip -n \(a) route add 192.168.77.0/24 via 198.51.100.2
                ip -n \(i) addr add 198.51.100.2/24 dev \(id)-i1 && ip -n \(i) link set \(id)-i1 up
                ip -n \(i) addr add 198.51.100.53/32 dev lo && ip -n \(i) addr add 192.168.77.7/32 dev lo
                ip -n \(a) addr add 2001:db8:100::1/64 dev \(id)-a1 nodad && ip -n \(i) addr add 2001:db8:100::2/64 dev \(id)-i1 nodad
                ip -n \(i) addr add 2001:db8:113::10/128 dev lo && ip -n \(i) addr add 2001:db8:113::11/128 dev lo
                ip -n \(a) -6 route add 2001:db8:113::/64 via 2001:db8:100::2
                mkdir -p /etc/netns/\(g) && echo "nameserver 198.51.100.53" > /etc/netns/\(g)/resolv.conf
                mkdir -p /etc/netns/\(a) && echo "nameserver 198.51.100.53" > /etc/netns/\(a)/resolv.conf
                ip -n \(a) route add 169.254.169.254/32 via 198.51.100.2
                ip -n \(i) addr add 169.254.169.254/32 dev lo && ip -n \(i) addr add \(Self.attackerResolver)/32 dev lo
                ip -n \(i) addr add \(Self.attackerResolverV6)/128 dev \(id)-i1 nodad
                """)
            // dnsmasq daemonizes (and closes every inherited descriptor, which confuses
            // Foundation's Process if it is our direct child); close() kills it by namespace.
            try sh(
                "ip netns exec \(i) dnsmasq --no-resolv --no-hosts --listen-address=198.51.100.53 --bind-interfaces --port=53 "
                    + "--local-ttl=300 --address=/api.example.test/203.0.113.10 --address=/other.example.test/203.0.113.11 "
                    + "--address=/rebind.example.test/10.9.9.9 --address=/private.example.test/192.168.77.7 --address=/v6.example.test/2001:db8:113::10 "
                    + "--address=/ip-only.example.test/203.0.113.12 --address=/cdn.example.test/203.0.113.12 --address=/proxy.example.test/203.0.113.13 "
                    + "--pid-file=\(directory)/dnsmasq.pid")
            usleep(300_000)
        }
    }

    /// Another guest namespace on its own veth to the appliance (10.0.3.2/30, gateway
    /// 10.0.3.1): returns the namespace and the appliance-side interface.
    func addGuest() throws -> (namespace: String, interface: String) {
        let ns = namespace + "2", id = shortID
        _ = try? sh("ip netns del \(ns)")
        try sh("ip netns add \(ns) && ip -n \(ns) link set lo up")
        extraNamespaces.append(ns)
        try sh(
            """
            ip link add \(id)-h0 netns \(ns) type veth peer name \(id)-b0 netns \(applianceNamespace)
            ip -n \(ns) addr add 10.0.3.2/30 dev \(id)-h0 && ip -n \(ns) link set \(id)-h0 up && ip -n \(ns) route add default via 10.0.3.1
            mkdir -p /etc/netns/\(ns) && echo "nameserver 198.51.100.53" > /etc/netns/\(ns)/resolv.conf
            """)
        return (ns, id + "-b0")
    }

    /// The guest-facing interface of the appliance.
    var guestInterface: String { shortID + "-a0" }

    /// Namespaces left by a test process that crashed (named after its pid) are removed.
    static func removeStaleNamespaces() {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? []).filter { $0.hasPrefix("kh-t") }
        for name in names {
            let pidText = name.dropFirst(4).split(separator: "-").first.map(String.init) ?? ""
            guard let pid = Int32(pidText), pid != getpid() % 100000 else { continue }
            if kill(pid, 0) == 0 { continue }  // its owner still runs
            let cleanup = Process()
            cleanup.executableURL = URL(fileURLWithPath: "/bin/sh")
            cleanup.arguments = ["-c", "ip netns pids \(name) | xargs -r kill -9; ip netns del \(name); rm -rf /etc/netns/\(name) /tmp/keyhole-e2e-\(name)"]
            try? cleanup.run()
            cleanup.waitUntilExit()
        }
    }

    func makePKI() throws {
        try sh(
            """
            cd \(directory) && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout upca.key -out upca.pem -days 2 -subj "/CN=Keyhole Test Upstream CA" 2>/dev/null
            for n in \(Self.names.joined(separator: " ")); do
              openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $n.key -out $n.csr -subj "/CN=$n" 2>/dev/null
              printf "subjectAltName=DNS:$n\\nextendedKeyUsage=serverAuth\\n" > $n.ext
              openssl x509 -req -in $n.csr -CA upca.pem -CAkey upca.key -CAcreateserial -out $n.pem -days 2 -extfile $n.ext 2>/dev/null
            done
            openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout selfsigned.key -out selfsigned.pem -days 2 -subj "/CN=api.example.test" -addext "subjectAltName=DNS:api.example.test" 2>/dev/null
            """)
    }

    /// Starts a recording upstream at ip:port: TLS with `cert` (a name from `names`, or
    /// "selfsigned"), or plain HTTP when nil. Returns the path of its request log.
    @discardableResult
    func upstream(_ ip: String, port: Int, cert: String?, extra: [String] = []) throws -> String {
        let log = "\(directory)/upstream-\(ip)-\(port).log"
        var arguments = ["netns", "exec", internetNamespace, "python3", CLI.root + "/Tests/KeyholeCLITests/Fixtures/upstream.py",
                         "--bind", ip, "--port", String(port), "--log", log] + extra
        if let cert { arguments += ["--cert", "\(directory)/\(cert).pem", "--key", "\(directory)/\(cert).key"] }
        let ready = directory + "/upstream-\(ip)-\(port).ready"
        let process = try spawn("/usr/sbin/ip", arguments, stdout: ready)
        processes.append(process)
        try waitFor(file: ready, containing: "ready")
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        return log
    }

    // MARK: - Attackers (appliance and launcher modes)

    /// Where the guest's attacker runs its own resolver, in the internet namespace.
    static let attackerResolver = "198.51.100.66"
    static let attackerResolverV6 = "2001:db8:100::66"

    /// Starts the attacker's resolver (a second dnsmasq on `attackerResolver` and
    /// `attackerResolverV6`): each domain in `answers` (and its subdomains) resolves to the
    /// attacker's address. close() ends it with everything else in the namespace.
    func startAttackerResolver(answers: [String: String] = ["api.example.test": "203.0.113.12", "cdn.example.test": "203.0.113.12"]) throws {
        precondition(mode != .redirect, "the attacker's resolver lives in the internet namespace")
        let addresses = answers.keys.sorted().map { "--address=/\($0)/\(answers[$0]!)" }.joined(separator: " ")
        try sh(
            "ip netns exec \(internetNamespace) dnsmasq --no-resolv --no-hosts --listen-address=\(Self.attackerResolver) "
                + "--listen-address=\(Self.attackerResolverV6) --bind-interfaces --port=53 --local-ttl=300 \(addresses) "
                + "--pid-file=\(directory)/dnsmasq-attacker.pid")
        usleep(300_000)
    }

    /// Issues a certificate from the test upstream CA with exactly `subjectAltName` (an
    /// openssl SAN list, such as `IP:203.0.113.12` or `DNS:*.cdn.example.test`); returns the
    /// name to pass as `cert` to `upstream`.
    @discardableResult
    func issueCertificate(_ name: String, subjectAltName: String, commonName: String? = nil) throws -> String {
        try sh(
            """
            cd \(directory) && openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout \(name).key -out \(name).csr -subj "/CN=\(commonName ?? name)" 2>/dev/null
            printf "subjectAltName=\(subjectAltName)\\nextendedKeyUsage=serverAuth\\n" > \(name).ext
            openssl x509 -req -in \(name).csr -CA upca.pem -CAkey upca.key -CAcreateserial -out \(name).pem -days 2 -extfile \(name).ext 2>/dev/null
            """)
        return name
    }

    /// A certificate chaining to the test upstream CA that names only `ip` (an iPAddress
    /// SAN, no dNSName), as an attacker who controls that address can get one.
    func ipOnlyCertificate(for ip: String) throws -> String {
        try issueCertificate("ip-" + ip, subjectAltName: "IP:" + ip, commonName: ip)
    }

    /// Starts a service that must stay unreachable (Fixtures/tcp_listener.py) in `namespace`
    /// (the internet's by default): every accepted connection, read and datagram becomes a
    /// JSON line in the returned log (`event` accept, data or datagram). With `http` it
    /// answers a request head with 200 and `body`.
    @discardableResult
    func listener(
        _ ip: String, port: Int, in namespace: String? = nil, udp: Bool = false, http: Bool = false, body: String? = nil, extra: [String] = []
    ) throws -> String {
        let name = "listener-\(ip)-\(port)\(udp ? "-udp" : "")"
        let log = "\(directory)/\(name).log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        var arguments = ["netns", "exec", namespace ?? internetNamespace, "python3", Self.fixture("tcp_listener.py"),
                         "--bind", ip, "--port", String(port), "--log", log]
        if udp { arguments.append("--udp") }
        if http { arguments.append("--http") }
        if let body { arguments += ["--body", body] }
        arguments += extra
        let ready = "\(directory)/\(name).ready"
        let process = try spawn("/usr/sbin/ip", arguments, stdout: ready)
        processes.append(process)
        try waitFor(file: ready, containing: "ready")
        return log
    }

    static func fixture(_ name: String) -> String { CLI.root + "/Tests/KeyholeCLITests/Fixtures/" + name }

    /// The guest asks `server` directly (Fixtures/dnsquery.py): the answer's addresses, one a
    /// line, on stdout; status 1 for an answer without addresses, 2 for no answer.
    func dnsQuery(_ name: String, server: String, type: String = "A", tcp: Bool = false, timeout: Int = 3) throws -> CLI.Result {
        try guest(
            "python3 \(shellQuote(Self.fixture("dnsquery.py"))) --server \(server) --name \(shellQuote(name)) --type \(type) --timeout \(timeout)"
                + (tcp ? " --tcp" : ""))
    }

    /// Points the guest's /etc/resolv.conf (for commands started from now on) at `address`.
    func setGuestResolver(_ address: String) throws {
        try "nameserver \(address)\n".write(toFile: "/etc/netns/\(namespace)/resolv.conf", atomically: true, encoding: .utf8)
    }

    /// The guest sends exact request bytes on one connection (Fixtures/exchange.py), over
    /// TLS with `sni` unless `tls` is false; one output line per request: "response <status
    /// line> <body>", or how the connection ended ("reset", "closed", "ssl-error …"). The
    /// chain is verified against the sandbox CA unless `verify` is false; the name never is
    /// (it may be an invalid host name on purpose).
    func exchange(ip: String, port: Int, tls: Bool = true, sni: String? = nil, verify: Bool = true, requests: [String]) throws -> CLI.Result {
        var command = "python3 \(shellQuote(Self.fixture("exchange.py"))) --ip \(ip) --port \(port)"
        if tls {
            command += " --tls" + (verify ? " --cafile \(stateDirectory)/ca.pem" : " --insecure")
            if let sni { command += " --sni \(shellQuote(sni))" }
        }
        for request in requests {
            command += " --request " + request.utf8.map { String(format: "%02x", $0) }.joined()
        }
        return try guest(command)
    }

    /// Writes the policy (with `{{DIR}}` replaced) and starts `keyhole proxy`: with --listen
    /// in redirect mode, with --interface in the appliance namespace in appliance mode.
    func startProxy(policy: String, pins: [String] = ["api.example.test=203.0.113.10"], extra: [String] = [], environment: [String: String] = [:]) throws {
        let path = directory + "/policy.yaml"
        try writePolicy(policy)
        metricsPort = 19000 + Int.random(in: 0..<900)
        var arguments = ["netns", "exec", applianceNamespace, CLI.binary, "proxy", "--policy", path,
                         "--state-dir", stateDirectory, "--audit-log", auditLog, "--metrics", "127.0.0.1:\(metricsPort)",
                         "--first-flight-timeout", "1"]
        switch mode {
        case .redirect:
            arguments += ["--listen", "127.0.0.1:15001"]
            for pin in pins { arguments += ["--pin", pin] }
        case .appliance, .launcher:
            arguments += ["--interface", guestInterface]
        }
        try? FileManager.default.removeItem(atPath: proxyStderr)
        let process = try spawn("/usr/sbin/ip", arguments + extra, stdout: proxyStdout, stderr: proxyStderr, environment: environment)
        proxy = process
        processes.append(process)
        try waitFor(file: proxyStderr, containing: mode == .appliance ? "guarding" : "listening on")
    }

    func writePolicy(_ policy: String) throws {
        try policy.replacingOccurrences(of: "{{DIR}}", with: directory).write(toFile: directory + "/policy.yaml", atomically: true, encoding: .utf8)
    }

    /// Runs a command in the appliance namespace (to look at its rules).
    func appliance(_ command: String) throws -> CLI.Result {
        try run("ip netns exec \(applianceNamespace) sh -c \(shellQuote(command))")
    }

    /// Runs a shell command inside the namespace (the guest's side).
    func guest(_ command: String, timeout: Int = 30) throws -> CLI.Result {
        try run("timeout \(timeout) ip netns exec \(namespace) sh -c \(shellQuote(command))")
    }

    /// curl as a guest would run it: trusting only the sandbox CA, name resolved to `ip`.
    func curl(_ url: String, ip: String = "203.0.113.10", _ options: String = "") throws -> CLI.Result {
        let host = URL(string: url)!.host!
        let port = URL(string: url)!.port ?? (url.hasPrefix("https") ? 443 : 80)
        return try guest(
            "curl -sS --max-time 10 --cacert \(stateDirectory)/ca.pem --resolve \(host):\(port):\(ip) \(options) '\(url)'")
    }

    /// curl in the guest resolving names itself (appliance and launcher modes: through the
    /// guest's resolver, which Keyhole observes), trusting only the sandbox CA.
    func guestCurl(_ url: String, _ options: String = "") throws -> CLI.Result {
        try guest("curl -sS --max-time 8 --cacert \(stateDirectory)/ca.pem \(options) '\(url)'")
    }

    func records(_ log: String) -> [[String: Any]] {
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
    }

    func header(_ record: [String: Any], _ name: String) -> String? {
        (record["headers"] as? [[String]])?.first { $0[0].lowercased() == name.lowercased() }?[1]
    }

    var audit: String { (try? String(contentsOfFile: auditLog, encoding: .utf8)) ?? "" }
    var stderr: String { (try? String(contentsOfFile: proxyStderr, encoding: .utf8)) ?? "" }

    func metricsText() throws -> String {
        try appliance("curl -sS --max-time 5 http://127.0.0.1:\(metricsPort)/metrics").stdout
    }

    /// Waits for the proxy to exit; returns its status, or nil if it is still running.
    func waitForProxyExit(seconds: Double) -> Int32? {
        guard let proxy else { return nil }
        let deadline = Date().addingTimeInterval(seconds)
        while proxy.isRunning, Date() < deadline { usleep(50_000) }
        return proxy.isRunning ? nil : proxy.terminationStatus
    }

    func proxyPID() throws -> Int32? {
        let out = try run("pgrep -f -n 'proxy --policy \(directory)/policy.yaml'").stdout
        return Int32(out.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    func close() {
        for process in processes where process.isRunning {
            kill(process.processIdentifier, SIGTERM)
        }
        usleep(300_000)
        for ns in Set([namespace, applianceNamespace, internetNamespace] + extraNamespaces) {
            // `ip netns exec` forwards nothing: end whatever still runs in the namespace.
            _ = try? run("ip netns pids \(ns) | xargs -r kill -9")
        }
        for process in processes where process.isRunning { kill(process.processIdentifier, SIGKILL) }
        for ns in Set([namespace, applianceNamespace, internetNamespace] + extraNamespaces) {
            _ = try? run("ip netns del \(ns); rm -rf /etc/netns/\(ns)")
        }
        try? FileManager.default.removeItem(atPath: directory)
    }

    // MARK: - Process helpers

    @discardableResult
    func sh(_ command: String) throws -> CLI.Result {
        let result = try run(command)
        guard result.status == 0 else {
            throw HarnessError.command(command, result.stderr)
        }
        return result
    }

    func run(_ command: String) throws -> CLI.Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = ["-c", command]
        process.standardInput = FileHandle.nullDevice
        return try CLI.collect(process)
    }

    func spawn(_ executable: String, _ arguments: [String], stdout: String, stderr: String? = nil, environment: [String: String] = [:]) throws -> Process {
        _ = FileManager.default.createFile(atPath: stdout, contents: nil)
        if let stderr { _ = FileManager.default.createFile(atPath: stderr, contents: nil) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        process.standardOutput = FileHandle(forWritingAtPath: stdout)
        process.standardError = stderr.flatMap { FileHandle(forWritingAtPath: $0) } ?? FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        return process
    }

    func waitFor(file: String, containing text: String, seconds: Double = 20) throws {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let content = try? String(contentsOfFile: file, encoding: .utf8), content.contains(text) { return }
            usleep(50_000)
        }
        throw HarnessError.timeout("\(file) never said '\(text)': \((try? String(contentsOfFile: file, encoding: .utf8)) ?? "")\n\(stderr)")
    }

    /// The idle-timeout tests' guest scripts (Python) watch their quiet connection with
    /// this: `read()` returns when the connection is closed; it prints how long that took,
    /// or that the connection stayed open (the socket's own timeout).
    static let watchQuietPython = """
        def watch_quiet(read):
            start = time.time()
            try:
                read()
                print('quiet closed after %.1f s' % (time.time() - start))
            except (ConnectionResetError, ssl.SSLError):
                print('quiet closed after %.1f s (reset)' % (time.time() - start))
            except TimeoutError:
                print('quiet still open')
        """

    /// What `watchQuietPython` printed: N of `quiet closed after N s`, or nil when no such
    /// line was printed.
    static func secondsUntilQuietClosed(_ output: String) -> Double? {
        let closed = output.split(separator: "\n").first { $0.hasPrefix("quiet closed after ") }
        return closed.flatMap { Double($0.dropFirst("quiet closed after ".count).prefix { $0 != " " }) }
    }

    func shellQuote(_ text: String) -> String { "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'" }
}

enum HarnessError: Error, CustomStringConvertible {
    case command(String, String)
    case timeout(String)

    var description: String {
        switch self {
        case .command(let command, let stderr): return "command failed: \(command)\n\(stderr)"
        case .timeout(let what): return "timed out: \(what)"
        }
    }
}
