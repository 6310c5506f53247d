import ArgumentParser
import Foundation
import KeyholePolicy

struct PolicyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy",
        abstract: "Work with policy files.",
        subcommands: [Check.self]
    )

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate policy files; print FILE:LINE:COL: message for every problem.",
            discussion: "Exit status: 0 when every file is valid, 1 when any is not. Secret values are loaded (from_env, from_file) but never printed."
        )

        @Argument(help: ArgumentHelp("Policy files to check.", valueName: "file"))
        var files: [String]

        @Flag(name: .shortAndLong, help: "Also print a summary of each valid policy (values are shown redacted).")
        var verbose = false

        func validate() throws {
            if files.isEmpty { throw ValidationError("give at least one policy file") }
        }

        func run() throws {
            var failed = false
            for file in files {
                do {
                    let policy = try PolicyLoader().load(file: file)
                    for warning in policy.warnings { Output.err(warning.description) }
                    Output.out("\(file): ok (\(policy.secrets.count) secret\(policy.secrets.count == 1 ? "" : "s"))")
                    if verbose { Output.out(PolicySummary.render(policy)) }
                } catch {
                    failed = true
                    for diagnostic in error.diagnostics { Output.err(diagnostic.description) }
                }
            }
            if failed { throw ExitCode(1) }
        }
    }
}

/// A human-readable description of a policy. Values appear only as a redaction.
enum PolicySummary {
    static func render(_ policy: Policy) -> String {
        var lines = ["  name: \(policy.name)", "  on_secret_violation: \(policy.network.onSecretViolation.rawValue)"]
        for secret in policy.secrets {
            let i = secret.inject
            let sites = [("headers", i.headers), ("basic_auth", i.basicAuth), ("query", i.query), ("body", i.body)]
                .filter(\.1).map(\.0).joined(separator: ",")
            lines.append("  secret \(secret.env): placeholder \(secret.placeholder), value \(secret.value) (\(secret.source))")
            lines.append("    hosts: \(secret.allowedHosts); inject: \(sites.isEmpty ? "nowhere" : sites); require_tls_identity: \(secret.requireTLSIdentity)")
        }
        let egress = policy.network.egress
        lines.append("  egress: default \(egress.default.rawValue); allow [\(egress.allow.map(\.description).joined(separator: ", "))]; deny [\(egress.deny.map(\.description).joined(separator: ", "))]")
        if !policy.network.tlsBypass.isEmpty { lines.append("  tls_bypass: \(policy.network.tlsBypass)") }
        if let guest = policy.guest {
            let image: String
            switch guest.image {
            case .builtin: image = "builtin"
            case .kernel(let kernel, let initrd, let disk): image = "kernel \(kernel)" + (initrd.map { " initrd \($0)" } ?? "") + (disk.map { " disk \($0)" } ?? "")
            }
            lines.append("  guest: \(image), \(guest.memoryMiB) MiB, \(guest.vcpus) vCPU, accel \(guest.accel.rawValue)")
        }
        return lines.joined(separator: "\n")
    }
}

/// Loading a policy for a command that cannot run without one: problems are printed as
/// FILE:LINE:COL: message and the command exits 2.
enum PolicyFile {
    static func load(_ path: String) throws -> Policy {
        do {
            return try PolicyLoader().load(file: path)
        } catch {
            for diagnostic in error.diagnostics { Output.err(diagnostic.description) }
            throw ExitCode(2)
        }
    }
}

/// The policy flags `keyhole run` and `keyhole proxy` share (the reference pages' CLI).
struct SecretFlags: ParsableArguments {
    @Option(
        name: .customLong("secret"),
        help: ArgumentHelp(
            "A secret: ENV@HOST[,HOST…] reads the real value from the host's $ENV (recommended); ENV=VALUE@HOST[,HOST…] gives it inline, where anyone who can list processes (ps) sees it. The guest gets $MSB_ENV in ENV. Repeatable.",
            valueName: "env@host"))
    var secrets: [String] = []

    @Option(
        name: .customLong("secret-pattern"),
        help: ArgumentHelp("Hosts for a secret by pattern: ENV@*.domain[,*.other] (one or more labels under the domain). Repeatable.", valueName: "env@*.domain"))
    var secretPatterns: [String] = []

    @Option(help: ArgumentHelp("block, block-and-log or block-and-terminate (default block).", valueName: "action"))
    var onSecretViolation: String?

    @Option(name: .customLong("upstream-ca"), help: ArgumentHelp("An extra PEM trust root for upstream servers. Repeatable.", valueName: "file"))
    var upstreamCA: [String] = []

    @Option(help: ArgumentHelp("A trusted resolver the guest's DNS goes to (default: the host's). Repeatable.", valueName: "ip"))
    var dns: [String] = []

    var commandLine: CommandLinePolicy {
        var flags = CommandLinePolicy()
        flags.secrets = secrets
        flags.secretPatterns = secretPatterns
        flags.onSecretViolation = onSecretViolation
        flags.upstreamCA = upstreamCA
        flags.dns = dns
        flags.workingDirectory = FileManager.default.currentDirectoryPath
        return flags
    }
}

extension PolicyFile {
    /// The policy file (if any) with the command line's flags merged in; problems are
    /// printed (`FILE:LINE:COL: message`, `--secret …: message`) and the command exits 2.
    static func load(_ path: String?, flags: CommandLinePolicy) throws -> Policy {
        let file = try path.map { try load($0) }
        do {
            return try flags.apply(to: file)
        } catch {
            for diagnostic in error.diagnostics { Output.err(diagnostic.description) }
            throw ExitCode(2)
        }
    }
}
