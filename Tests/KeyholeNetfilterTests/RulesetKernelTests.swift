import Foundation
import KeyholeNetfilter
import KeyholePolicy
import Testing

/// The generated rules load into the kernel: nft accepts the table (overlapping intervals,
/// fib, DNAT syntax) and iptables-nft the queue chain (conntrack matches), in a namespace
/// of the test's own.
@Suite("Appliance rules in the kernel", .serialized, .enabled(if: getuid() == 0, "needs root for a network namespace"))
struct RulesetKernelTests {
    func shell(_ command: String) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    @Test(arguments: [EgressPolicy.Default.public, .none, .all])
    func theTableAndTheQueueChainLoad(_ egressDefault: EgressPolicy.Default) throws {
        let namespace = "kh-nft-\(getpid())-\(egressDefault.rawValue)"
        _ = try shell("ip netns del \(namespace) 2>/dev/null")
        let created = try shell("ip netns add \(namespace) && ip -n \(namespace) link add t0 type veth peer name t1")
        try #require(created.status == 0, "\(created.output)")
        defer { _ = try? shell("ip netns del \(namespace)") }
        let rules = ApplianceRules(
            interface: "t0", proxyPort: 15001, queueNumber: 9,
            egress: EgressPolicy(
                default: egressDefault, allow: [.network(IPNetwork("192.168.77.0/24")!), .host("ok.example.test")],
                deny: [.network(IPNetwork("203.0.113.66/32")!), .network(IPNetwork("2001:db8:66::/48")!), .host("no.example.test")]),
            resolvers: [IPAddress("198.51.100.53")!, IPAddress("10.0.2.1")!, IPAddress("2001:db8::53")!])
        let file = "/tmp/\(namespace).nft"
        try rules.nftScript().write(toFile: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: file) }
        let loaded = try shell("ip netns exec \(namespace) nft -f \(file)")
        #expect(loaded.status == 0, "\(loaded.output)")
        let listed = try shell("ip netns exec \(namespace) nft list table inet \(rules.tableName)")
        #expect(listed.output.contains("fib saddr . iif oif missing drop"), "\(listed.output)")
        #expect(listed.output.contains("dnat ip to 198.51.100.53"), "\(listed.output)")
        for command in rules.queueInstallCommands() {
            let quoted = command.map { "'\($0)'" }.joined(separator: " ")
            let installed = try shell("ip netns exec \(namespace) iptables-nft -w \(quoted)")
            #expect(installed.status == 0, "\(command): \(installed.output)")
        }
        let saved = try shell("ip netns exec \(namespace) iptables-nft-save -t mangle")
        #expect(saved.output.contains("--ctdir REPLY"), "\(saved.output)")
    }
}
