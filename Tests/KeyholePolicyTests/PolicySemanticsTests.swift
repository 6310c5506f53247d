import Foundation
import KeyholePolicy
import Testing

@Suite("Policy semantics")
struct PolicySemanticsTests {
    let loader = PolicyLoader(environment: ["TOKEN": "real-value-from-env"])

    func load(_ yaml: String) throws -> Policy {
        try loader.load(yaml: yaml, file: "test.yaml")
    }

    @Test func defaultsFollowTheContract() throws {
        let policy = try load(
            """
            version: 1
            secrets:
              - env: TOKEN
                from_env: TOKEN
                allow_hosts: [API.Example.COM.]
            """)
        let secret = try #require(policy.secrets.first)
        #expect(secret.placeholder == "$MSB_TOKEN")
        #expect(secret.value.bytes == Array("real-value-from-env".utf8))
        #expect(secret.requireTLSIdentity)
        #expect(secret.inject == Injection(headers: true, basicAuth: true, query: false, body: false))
        #expect(secret.allowedHosts.allows("api.example.com"))
        #expect(secret.allowedHosts.allows("API.EXAMPLE.COM."))
        #expect(!secret.allowedHosts.allows("example.com"))
        #expect(policy.network.onSecretViolation == .block)
        #expect(policy.network.egress.default == .public)
        #expect(policy.name == "test")
        #expect(policy.guest == nil)
    }

    @Test func passthroughHostsAndAPerSecretActionWhereTheStricterWins() throws {
        let policy = try load(
            """
            version: 1
            secrets:
              - env: TOKEN
                from_env: TOKEN
                allow_hosts: [api.example.com]
                passthrough_hosts: [api.llm.test]
                passthrough_host_patterns: ["*.openai.test"]
                on_violation: block-and-terminate
            network:
              on_secret_violation: block-and-log
            """)
        let secret = try #require(policy.secrets.first)
        #expect(secret.passthroughHosts.allows("api.llm.test") && secret.passthroughHosts.allows("chat.openai.test"))
        #expect(!secret.passthroughHosts.allows("api.example.com"))
        #expect(policy.network.onSecretViolation.stricter(secret.onViolation) == .blockAndTerminate)
        #expect(ViolationAction.blockAndTerminate.stricter(.block) == .blockAndTerminate)
        #expect(ViolationAction.blockAndLog.stricter(nil) == .blockAndLog)
        #expect(ViolationAction.block.stricter(.blockAndLog) == .blockAndLog)
        // A host cannot be both: it would get the value.
        #expect(throws: PolicyError.self) {
            try load(
                """
                version: 1
                secrets:
                  - env: TOKEN
                    from_env: TOKEN
                    allow_hosts: [api.example.com]
                    passthrough_hosts: [API.example.com]
                """)
        }
        do {
            _ = try load("version: 1\nsecrets:\n  - env: TOKEN\n    from_env: TOKEN\n    allow_hosts: [a.example.com]\n    passthrough_hosts: [a.example.com]\n")
        } catch {
            #expect((error as? PolicyError)?.diagnostics.map(\.description) == ["test.yaml:6:25: 'a.example.com' is both an allowed host and a passthrough host of 'TOKEN': it gets the value; remove it from one of them"])
        }
    }

    @Test func hostPatternsNeverMatchTheApex() throws {
        let pattern = try #require(HostPattern("*.githubusercontent.com"))
        let list = HostAllowList(patterns: [pattern])
        #expect(list.allows("raw.githubusercontent.com"))
        #expect(list.allows("a.b.githubusercontent.com"))
        #expect(list.allows("RAW.GitHubUserContent.com."))
        #expect(!list.allows("githubusercontent.com"))
        #expect(!list.allows("evilgithubusercontent.com"))
        #expect(!list.allows("githubusercontent.com.evil.com"))
        #expect(!list.allows(""))
    }

    @Test func secretValuesNeverAppearInText() throws {
        let policy = try load(
            """
            version: 1
            secrets:
              - env: TOKEN
                value: "inline-real-value"
                allow_hosts: [api.example.com]
            """)
        let secret = try #require(policy.secrets.first)
        var dumped = ""
        dump(secret, to: &dumped)
        var dumpedValue = ""
        dump(secret.value, to: &dumpedValue)
        for text in [
            "\(secret)", String(describing: secret), String(reflecting: secret), "\(secret.value)",
            String(reflecting: secret.value), dumped, dumpedValue, "\(policy.secrets)",
        ] {
            #expect(!text.contains("inline-real-value"), "leaked in: \(text)")
        }
        #expect("\(secret.value)" == "<redacted>")
    }

    @Test func fromFileStripsOneTrailingNewline() throws {
        let directory = "/tmp/keyhole-policy-test-\(getpid())"
        mkdir(directory, 0o700)
        defer {
            unlink(directory + "/secret")
            rmdir(directory)
        }
        let fd = open(directory + "/secret", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        _ = "file-value\n".withCString { write(fd, $0, 11) }
        close(fd)
        let policy = try loader.load(
            yaml: """
                version: 1
                secrets:
                  - env: TOKEN
                    from_file: secret
                    allow_hosts: [api.example.com]
                """, file: "p.yaml", baseDirectory: directory)
        #expect(policy.secrets.first?.value.bytes == Array("file-value".utf8))
        #expect(policy.secrets.first?.source == .file(directory + "/secret"))
    }

    @Test func dangerousAnyHostIsAcceptedWithAWarning() throws {
        let policy = try load(
            """
            version: 1
            secrets:
              - env: TOKEN
                value: v-any-host
                allow_any_host_dangerous: true
            """)
        #expect(policy.secrets.first?.allowedHosts.allows("anything.example") == true)
        #expect(policy.warnings.count == 1)
        #expect(policy.warnings.first?.description.hasPrefix("test.yaml:5:31: warning:") == true)
    }

    @Test func fullNetworkAndGuestSectionsParse() throws {
        let policy = try load(
            """
            version: 1
            name: worker
            secrets: []
            network:
              on_secret_violation: block-and-terminate
              tls_bypass: [pinned.example.com, "*.pinned.example.net"]
              egress: { default: none, allow: [203.0.113.0/24, "pkg.example.org", "2001:db8::/32"], deny: [203.0.113.7] }
              gateway: 10.0.2.1/30
              dns: [10.0.2.1, "2001:db8::53"]
            guest:
              memory_mib: 256
              vcpus: 2
              accel: tcg
              env: { LANG: C.UTF-8, DEBUG: 1 }
              command: [sh, -c, "echo hi"]
            """)
        #expect(policy.network.onSecretViolation == .blockAndTerminate)
        #expect(policy.network.tlsBypass.allows("pinned.example.com"))
        #expect(policy.network.tlsBypass.allows("a.pinned.example.net"))
        #expect(policy.network.egress.default == .none)
        #expect(policy.network.egress.allow.count == 3)
        #expect(policy.network.egress.deny == [.network(IPNetwork("203.0.113.7/32")!)])
        #expect(policy.network.gateway?.description == "10.0.2.1/30")
        #expect(policy.network.gateway?.network.description == "10.0.2.0/30")
        #expect(policy.network.dns.map(\.description) == ["10.0.2.1", "2001:db8::53"])
        let guest = try #require(policy.guest)
        #expect(guest.image == .builtin)
        #expect(guest.memoryMiB == 256 && guest.vcpus == 2 && guest.accel == .tcg)
        #expect(guest.env == [EnvironmentEntry(name: "LANG", value: "C.UTF-8"), EnvironmentEntry(name: "DEBUG", value: "1")])
        #expect(guest.command == ["sh", "-c", "echo hi"])
    }
}

@Suite("Addresses")
struct AddressTests {
    @Test func scopes() {
        #expect(IPAddress("10.1.2.3")?.scope == .private)
        #expect(IPAddress("127.0.0.1")?.scope == .loopback)
        #expect(IPAddress("169.254.169.254")?.scope == .linkLocal)
        #expect(IPAddress("::ffff:192.168.1.1")?.scope == .private)
        #expect(IPAddress("fd00::1")?.scope == .private)
        #expect(IPAddress("::1")?.scope == .loopback)
        #expect(IPAddress("8.8.8.8")?.isPublic == true)
        #expect(IPAddress("203.0.113.10")?.isPublic == true)
        #expect(IPAddress("2606:4700::1111")?.isPublic == true)
        // Translated forms are what they carry.
        #expect(IPAddress("64:ff9b::a9fe:a9fe")?.scope == .linkLocal)
        #expect(IPAddress("2002:0a00:0001::")?.scope == .private)
        #expect(IPAddress("64:ff9b::a9fe:a9fe")?.embeddedIPv4 == IPAddress("169.254.169.254"))
        #expect(IPAddress("2001:db8::1")?.embeddedIPv4 == nil)
    }

    @Test func allowListsMatchOnlyValidNames() {
        let list = HostAllowList(exact: ["api.example.com"], patterns: [HostPattern("*.cdn.example.com")!])
        #expect(list.allows("API.example.com."))
        #expect(list.allows("a.cdn.example.com"))
        #expect(!list.allows("bad-.cdn.example.com"))
        #expect(!list.allows("a_b..cdn.example.com"))
        let any = HostAllowList(anyHost: true)
        #expect(any.allows("anything.example.net"))
        #expect(!any.allows("203.0.113.12"), "an IP literal is no name, even for allow_any_host_dangerous")
        #expect(!any.allows("bad-.example.net"))
        #expect(!any.allows(""))
    }

    @Test func networks() throws {
        let net = try #require(IPNetwork("172.16.0.0/12"))
        #expect(net.contains(IPAddress("172.31.255.255")!))
        #expect(!net.contains(IPAddress("172.32.0.0")!))
        #expect(IPNetwork("10.0.0.1/8") == nil)
        #expect(IPNetwork("10.0.0.0/33") == nil)
        #expect(IPNetwork("fe80::/10")!.contains(IPAddress("fe80::1")!))
        #expect(IPNetwork("0.0.0.0/0")!.contains(IPAddress("1.2.3.4")!))
        #expect(IPNetwork("::/0")!.contains(IPAddress("::1")!))
        #expect(IPAddress("1.2.3") == nil)
        #expect(IPAddress("2001:db8::1")?.description == "2001:db8::1")
    }

    @Test func suggestions() {
        #expect(HostName.problem(with: "api.example.com") == nil)
        #expect(HostName.problem(with: "1.2.3.4") != nil)
    }

    /// Each invalid name gets the reason that names its first fault, in this order: length,
    /// IP literal, then label by label (empty, too long, a character, a hyphen at an end),
    /// then all digits.
    @Test func hostNameProblemsNameTheFirstFault() {
        let ip = "is an IP address; allow lists name hosts, because identity is established by name (SNI, Host, DNS)"
        let long = String(repeating: "a", count: 64)
        let cases: [(String, String?)] = [
            ("api.example.com", nil), ("a", nil), ("x_y.example-1.com", nil), ("1.example.com", nil), ("123", "is all digits and dots, which is not a host name"),
            ("", "is empty"),
            (String(repeating: "a.", count: 127), "is longer than 253 characters"),
            ("10.0.0.1", ip), ("::1", ip), ("2001:db8::1", ip), ("::ffff:10.0.0.1", ip),
            ("1.2.3", "is all digits and dots, which is not a host name"),
            ("1.2.3.4.5", "is all digits and dots, which is not a host name"),
            ("a..b", "has an empty label"), (".a", "has an empty label"), ("a.", "has an empty label"),
            ("\(long).com", "has a label longer than 63 characters"),
            ("\(long)*.com", "has a label longer than 63 characters"),
            ("a.\(long)", "has a label longer than 63 characters"),
            ("*.example.com", "contains '*'; wildcards belong in allow_host_patterns"),
            ("bücher.example", "is not ASCII; write internationalized names in their xn-- form"),
            ("a b.example", "contains a character that is not allowed in a host name"),
            ("api:443", "contains a character that is not allowed in a host name"),
            ("-x.example.com", "has a label that starts or ends with '-'"),
            ("x-.example.com", "has a label that starts or ends with '-'"),
            ("-x.a b", "has a label that starts or ends with '-'"),
        ]
        for (name, expected) in cases {
            #expect(HostName.problem(with: name) == expected, "\(name)")
        }
        #expect(HostName.problem(with: String(repeating: "a.", count: 126) + "a") == nil)
    }

    @Test func normalizingLowersCaseAndDropsOneTrailingDot() {
        #expect(HostName.normalize("API.Example.COM.") == "api.example.com")
        #expect(HostName.normalize("api.example.com") == "api.example.com")
        #expect(HostName.normalize("api.example.com..") == "api.example.com.")
        #expect(HostName.normalize("api.example.com"[...]) == "api.example.com")
        #expect(HostName.normalize("") == "")
    }
}
