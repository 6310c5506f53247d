import Foundation
import Testing

/// Agents: a transcript that quotes the placeholder reaches an LLM-style upstream listed in
/// `passthrough_hosts` unchanged (never the value), while the same placeholder to another
/// host is blocked; a secret's own `on_violation` is stricter than the network's and wins.
/// Root only; CI runs as root.
@Suite("Passthrough end to end", .serialized, .enabled(if: isRoot, "needs root for network namespaces"))
struct PassthroughEndToEndTests {
    static let realValue = "e2e-real-token-0001"

    static let policy = """
        version: 1
        name: agent
        secrets:
          - env: TOKEN
            value: "\(realValue)"
            allow_hosts: [api.example.test]
            passthrough_hosts: [llm.example.test]
          - env: OTHER
            value: "e2e-other-value-0002"
            allow_hosts: [api.example.test]
            on_violation: block-and-log
        network:
          on_secret_violation: block
          upstream_ca: [{{DIR}}/upca.pem]
        """

    @Test func theTranscriptGoesToTheLLMUnchangedAndNowhereElse() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let cert = try harness.issueCertificate("llm.example.test", subjectAltName: "DNS:llm.example.test")
        let llm = try harness.upstream("203.0.113.10", port: 443, cert: cert)
        try harness.startProxy(policy: Self.policy, pins: ["llm.example.test=203.0.113.10"])
        let transcript = #"{"messages":[{"role":"tool","content":"TOKEN=$MSB_TOKEN"}]}"#
        let sent = try harness.curl(
            "https://llm.example.test/v1/chat", "-X POST -H 'Content-Type: application/json' --data-binary '\(transcript)'")
        #expect(sent.stdout == "ok\n", "\(sent.stdout) \(sent.stderr)")
        let records = harness.records(llm)
        #expect(records.count == 1)
        #expect(records.first?["body"] as? String == transcript, "the placeholder arrived unchanged")
        #expect(harness.audit.contains("\"event\":\"passed-through\""))
        // OTHER has no passthrough there: a violation. The network says `block` (no audit
        // line); the secret says block-and-log, the stricter: logged.
        let other = try harness.curl("https://llm.example.test/v1/chat", "-X POST --data-binary 'key=$MSB_OTHER'")
        #expect(other.status != 0)
        #expect(harness.audit.contains("\"event\":\"violation\"") && harness.audit.contains("\"secret\":\"OTHER\""), "\(harness.audit)")
        #expect(harness.audit.contains("\"action\":\"block-and-log\""))
        // A streamed body: what came before the placeholder went on; the placeholder did not.
        let bodies = harness.records(llm).compactMap { $0["body"] as? String }
        #expect(bodies.count == 2 && !bodies[1].contains("MSB_OTHER") && !bodies[1].contains("e2e-other-value"), "\(bodies)")
        #expect(!harness.audit.contains(Self.realValue))
    }
}
