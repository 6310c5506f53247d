import Foundation
public import KeyholePolicy

/// Installs and removes Keyhole's rules for one interface, with the system's `nft` and
/// `iptables-nft`/`ip6tables-nft` binaries.
public final class Appliance: Sendable {
    public let rules: ApplianceRules
    /// Whether the mangle tables existed before Keyhole first added its queue chain (so
    /// removal can leave `nft list ruleset` exactly as it was).
    private let hadMangle: [String: Bool]
    /// Where that is recorded while the rules are installed: a run killed with -9 leaves
    /// the record, and the next run on the interface uses it instead of what it sees (the
    /// crashed run's own mangle tables), so its removal undoes the crashed run's too.
    private let record: String?

    public init(rules: ApplianceRules, stateDirectory: String? = nil) {
        self.rules = rules
        let record = stateDirectory.map { "\($0)/appliance/\(rules.tableName).installed" }
        self.record = record
        if let record, let text = try? String(contentsOfFile: record, encoding: .utf8) {
            var had: [String: Bool] = [:]
            for line in text.split(separator: "\n") {
                let parts = line.split(separator: "=")
                if parts.count == 2 { had[String(parts[0])] = parts[1] == "1" }
            }
            hadMangle = had
            return
        }
        var had: [String: Bool] = [:]
        for family in ["ip", "ip6"] {
            had[family] = (try? HostCommand.run("/usr/sbin/nft", ["list", "table", family, "mangle"])) != nil
        }
        hadMangle = had
    }

    /// Replaces any stale copy, then installs the table and the queue chain.
    public func install() throws(NetfilterError) {
        if let record {
            let text = hadMangle.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value ? 1 : 0)\n" }.joined()
            try? FileManager.default.createDirectory(atPath: (record as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try? text.write(toFile: record, atomically: true, encoding: .utf8)
        }
        removeQueue()
        do {
            _ = try HostCommand.run("/usr/sbin/nft", ["-f", "-"], input: rules.nftScript())
            for binary in ["/usr/sbin/iptables-nft", "/usr/sbin/ip6tables-nft"] {
                for command in rules.queueInstallCommands() {
                    _ = try HostCommand.run(binary, ["-w"] + command)
                }
            }
        } catch {
            remove()
            throw error
        }
    }

    /// Removes everything `install` added; safe to call more than once.
    public func remove() {
        removeQueue()
        _ = try? HostCommand.run("/usr/sbin/nft", ["-f", "-"], input: rules.nftRemoveScript)
        for (family, existed) in hadMangle where !existed {
            // iptables-nft created the table (with empty base chains) for our queue chain:
            // take it away again when nothing else put a rule in it meanwhile.
            guard let listing = try? HostCommand.run("/usr/sbin/nft", ["list", "table", family, "mangle"]) else { continue }
            let rules = listing.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { line in
                !line.isEmpty && !line.hasPrefix("table") && !line.hasPrefix("chain") && !line.hasPrefix("type") && line != "}"
            }
            if rules.isEmpty { _ = try? HostCommand.run("/usr/sbin/nft", ["delete", "table", family, "mangle"]) }
        }
        if let record { try? FileManager.default.removeItem(atPath: record) }
    }

    /// Whether the rules are in place right now: the nft table, and the DNS queue chain in
    /// each family's mangle table (for health checks: someone may flush them under us).
    public func isInstalled() -> Bool {
        guard (try? HostCommand.run("/usr/sbin/nft", ["list", "table", "inet", rules.tableName])) != nil else { return false }
        for binary in ["/usr/sbin/iptables-nft", "/usr/sbin/ip6tables-nft"] {
            guard (try? HostCommand.run(binary, ["-w", "-t", "mangle", "-S", rules.queueChain])) != nil else { return false }
        }
        return true
    }

    /// Swaps the table for a drop-everything one and removes the queue chain; `remove()`
    /// takes the quarantine away too.
    public func quarantine() {
        removeQueue()
        _ = try? HostCommand.run("/usr/sbin/nft", ["-f", "-"], input: rules.quarantineScript())
    }

    private func removeQueue() {
        for binary in ["/usr/sbin/iptables-nft", "/usr/sbin/ip6tables-nft"] {
            for command in rules.queueRemoveCommands() {
                _ = try? HostCommand.run(binary, ["-w"] + command)
            }
        }
    }

    /// Puts `address` on the interface (`network.gateway`) and brings it up.
    public static func configure(interface: String, address: InterfaceAddress?) throws(NetfilterError) {
        guard FileManager.default.fileExists(atPath: "/sys/class/net/\(interface)") else {
            throw .interface(interface, "does not exist")
        }
        if let address {
            _ = try HostCommand.run("/usr/sbin/ip", ["addr", "replace", address.description, "dev", interface])
        }
        _ = try HostCommand.run("/usr/sbin/ip", ["link", "set", interface, "up"])
    }

    /// Enables forwarding (for the guest's DNS and non-TCP egress); returns the old values.
    public static func enableForwarding() -> [String: String] {
        var previous: [String: String] = [:]
        for path in ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"] {
            previous[path] = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
            try? "1".write(toFile: path, atomically: false, encoding: .utf8)
        }
        return previous
    }

    public static func restore(_ values: [String: String]) {
        for (path, value) in values { try? value.write(toFile: path, atomically: false, encoding: .utf8) }
    }
}
