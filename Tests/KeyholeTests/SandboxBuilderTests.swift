import Foundation
import Keyhole
import Testing

/// The SDK's builders: the reference pages' names and defaults, the policy file's checks
/// and messages, and no real value in any textual form.
@Suite("SDK builders")
struct SandboxBuilderTests {
    @Test func theReferenceExampleBuildsThePolicyAFileWould() throws {
        let policy = try Sandbox.builder("worker")
            .memory(mib: 256)
            .vcpus(2)
            .env("LANG", "C.UTF-8")
            .secret { $0.env("GITHUB_TOKEN").value("ghp-real").allowHost("api.github.com").allowHostPattern("*.githubusercontent.com").injectBody(true) }
            .secretEnv("SERVICE_API_KEY", value: "svc-real", allowedHost: "api.example.com")
            .network { $0.onSecretViolation(.blockAndLog).secretEnv("STRIPE_KEY", value: "sk-real", placeholder: "$STRIPE", allowedHost: "api.stripe.com") }
            .policy()
        #expect(policy.name == "worker")
        #expect(policy.secrets.map(\.env) == ["GITHUB_TOKEN", "SERVICE_API_KEY", "STRIPE_KEY"])
        #expect(policy.secrets.map(\.placeholder) == ["$MSB_GITHUB_TOKEN", "$MSB_SERVICE_API_KEY", "$STRIPE"])
        let github = policy.secrets[0]
        #expect(github.value.bytes == Array("ghp-real".utf8))
        #expect(github.allowedHosts.allows("api.github.com") && github.allowedHosts.allows("raw.githubusercontent.com"))
        #expect(!github.allowedHosts.allows("githubusercontent.com") && !github.allowedHosts.allows("evil.example"))
        #expect(github.inject.body && github.inject.headers && github.inject.basicAuth && !github.inject.query)
        #expect(github.requireTLSIdentity)
        #expect(policy.network.onSecretViolation == .blockAndLog)
        #expect(policy.guest?.memoryMiB == 256 && policy.guest?.vcpus == 2 && policy.guest?.image == .builtin)
        #expect(policy.guest?.env.map(\.name) == ["LANG"])
    }

    @Test func defaultsFollowTheReferencePages() throws {
        let entry = SecretBuilder().env("OPENAI_API_KEY").value("sk").allowHost("api.openai.com").build()
        #expect(entry.placeholder == nil && entry.effectivePlaceholder == "$MSB_OPENAI_API_KEY")
        #expect(entry.injection == SecretInjection(headers: true, basicAuth: true, queryParams: false, body: false))
        #expect(entry.requireTlsIdentity && !entry.allowAnyHost)
        let policy = try Sandbox.builder("agent").secret(entry).policy()
        #expect(policy.network.onSecretViolation == ViolationAction.block)
        #expect(policy.guest?.memoryMiB == 512 && policy.guest?.vcpus == 1)
    }

    @Test func badConfigurationsGetThePolicyFilesMessages() {
        #expect {
            try Sandbox.builder("no spaces allowed")
                .secret { $0.env("TOKEN").value("real-value-xyz") }
                .secret { $0.env("TOKEN").value("v2").allowHost("bad_host!") }
                .secretEnv("LINE", value: "a\nb", allowedHost: "api.example.com")
                .memory(mib: 1)
                .policy()
        } throws: { error in
            guard case SandboxError.invalidConfiguration(let problems) = error else { return false }
            let text = problems.joined(separator: "\n")
            return problems.contains("name may contain only letters, digits, '-' and '_'")
                && problems.contains(
                    "secret 'TOKEN' has no allowed host: add allow_hosts or allow_host_patterns (or allow_any_host_dangerous: true to accept the risk)")
                && problems.contains { $0.hasPrefix("allowed host 'bad_host!'") }
                && problems.contains { $0.hasPrefix("the real value of 'LINE' contains a control character") }
                && problems.contains("guest.memory_mib must be between 64 and 1048576, found 1")
                && !text.contains("real-value-xyz")
        }
    }

    @Test func aPerSecretActionAndPassthroughHostsReachThePolicy() throws {
        let policy = try Sandbox.builder("agent")
            .secret { $0.env("TOKEN").value("v").allowHost("api.example.com").passthroughHost("llm.example.com").onViolation(.blockAndTerminate) }
            .policy()
        #expect(policy.secrets[0].passthroughHosts.allows("llm.example.com"))
        #expect(policy.secrets[0].onViolation == .blockAndTerminate)
        #expect(ViolationAction.block.stricter(policy.secrets[0].onViolation) == .blockAndTerminate)
    }

    @Test func noTextualFormShowsTheValue() {
        let entry = SecretEntry(envVar: "TOKEN", value: "do-not-print-me", allowedHosts: ["a.example"])
        var dumped = ""
        dump(entry, to: &dumped)
        for text in ["\(entry)", String(describing: entry), String(reflecting: entry), dumped] {
            #expect(!text.contains("do-not-print-me"), "\(text)")
            #expect(text.contains("<redacted>"))
        }
    }

    @Test func theApplianceBuilderValidatesTheSameWay() throws {
        let policy = try Appliance.builder(interface: "tap0").secretEnv("TOKEN", value: "v", allowedHost: "api.example.com").policy()
        #expect(policy.name == "tap0" && policy.secrets.count == 1)
        #expect(throws: SandboxError.self) { try Appliance.builder(interface: "tap0").secretEnv("TOKEN", value: "v", allowedHost: "1.2.3.4").policy() }
    }
}

extension SandboxBuilderTests {
    @Test func anImageByNameOtherThanBuiltinGetsTheFilesMessage() throws {
        #expect(try Sandbox.builder("w").image("builtin").policy().guest?.image == .builtin)
        #expect {
            try Sandbox.builder("w").image("python").policy()
        } throws: { error in
            error as? SandboxError == .invalidConfiguration(["guest.image must be 'builtin'; for your own guest give kernel (with initrd or disk) instead"])
        }
    }
}

extension SandboxBuilderTests {
    @Test func aPlainEnvironmentVariableMayNotCarryASecretsValue() {
        #expect {
            try Sandbox.builder("w").secretEnv("TOKEN", value: "tok-real-123", allowedHost: "api.example.com").env("COPY", "x-tok-real-123").policy()
        } throws: { error in
            error as? SandboxError == .invalidConfiguration(["guest.env 'COPY' holds the real value of secret 'TOKEN'; the guest must see only its placeholder"])
        }
    }
}
