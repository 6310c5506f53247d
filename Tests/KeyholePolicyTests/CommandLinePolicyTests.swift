import Foundation
import KeyholePolicy
import Testing

/// `--secret ENV@HOST` and friends: parsed into policy documents, validated with the file's
/// checks, merged with a file; conflicts name both places; inline values never echoed.
@Suite("Command-line policy")
struct CommandLinePolicyTests {
    let environment = ["GITHUB_TOKEN": "ghp-real-from-env", "OTHER": "other-real"]

    func flags(_ secrets: [String], patterns: [String] = [], action: String? = nil) -> CommandLinePolicy {
        var flags = CommandLinePolicy()
        flags.secrets = secrets
        flags.secretPatterns = patterns
        flags.onSecretViolation = action
        return flags
    }

    func file(_ yaml: String) throws -> Policy {
        try PolicyLoader(environment: environment).load(yaml: yaml, file: "p.yaml")
    }

    func problems(_ body: () throws(PolicyError) -> Policy) -> [String] {
        do {
            _ = try body()
            return []
        } catch {
            return error.diagnostics.map(\.description)
        }
    }

    @Test func envAtHostReadsTheHostsVariableAndGetsTheDefaultPlaceholder() throws {
        let policy = try flags(["GITHUB_TOKEN@api.github.com,uploads.github.com"], patterns: ["GITHUB_TOKEN@*.githubusercontent.com"])
            .apply(to: nil, environment: environment)
        #expect(policy.name == "keyhole")
        let secret = try #require(policy.secrets.first)
        #expect(policy.secrets.count == 1)
        #expect(secret.env == "GITHUB_TOKEN")
        #expect(secret.placeholder == "$MSB_GITHUB_TOKEN")
        #expect(secret.value.bytes == Array("ghp-real-from-env".utf8))
        #expect(secret.source == .environment("GITHUB_TOKEN"))
        #expect(secret.allowedHosts.allows("api.github.com") && secret.allowedHosts.allows("uploads.github.com"))
        #expect(secret.allowedHosts.allows("raw.githubusercontent.com") && !secret.allowedHosts.allows("githubusercontent.com"))
        #expect(!secret.allowedHosts.allows("evil.example"))
        // The reference pages' defaults.
        #expect(secret.requireTLSIdentity && secret.inject == Injection())
        #expect(policy.network.onSecretViolation == .block)
    }

    @Test func envEqualsValueTakesTheValueWhichMayHoldAtAndEquals() throws {
        let policy = try flags(["TOKEN=p@ss=word@api.example.com"], action: "block-and-log").apply(to: nil, environment: [:])
        let secret = try #require(policy.secrets.first)
        #expect(secret.env == "TOKEN")
        #expect(secret.value.bytes == Array("p@ss=word".utf8))
        #expect(secret.allowedHosts.allows("api.example.com"))
        #expect(policy.network.onSecretViolation == .blockAndLog)
    }

    @Test func badFlagsGetTheFilesMessagesPrefixedByTheFlagAndNeverTheValue() {
        let found = problems { () throws(PolicyError) in
            try flags(["TOKEN=hunter2-secret@bad_host!", "NOHOST", "MISSING@api.example.com", "X=v@*.example.com"], action: "explode")
                .apply(to: nil, environment: [:])
        }
        let text = found.joined(separator: "\n")
        #expect(found.contains { $0.hasPrefix("--secret TOKEN=…@…: what follows the last '@' is not a list of host names") }, "\(text)")
        #expect(found.contains("--secret NOHOST: must be ENV@HOST[,HOST…] or ENV=VALUE@HOST[,HOST…]"), "\(text)")
        #expect(found.contains("--secret MISSING@api.example.com: environment variable 'MISSING' is not set (from_env)"), "\(text)")
        #expect(found.contains { $0.hasPrefix("--secret X=…@*.example.com: '*.example.com' is a host pattern; give it as --secret-pattern") }, "\(text)")
        #expect(found.contains { $0.hasPrefix("--on-secret-violation explode: on_secret_violation must be one of block, block-and-log, block-and-terminate") }, "\(text)")
        #expect(!text.contains("hunter2") && !text.contains("bad_host"))
    }

    /// Mistakes that would put a credential in an error message: a value holding '@' with
    /// its host forgotten, a token where the name belongs.
    @Test func anInlineValueNeverShowsEvenWhenTheFlagIsMistyped() {
        let found = problems { () throws(PolicyError) in
            try flags(["DB=p@ss!word-tail", "ghp_abcdef123@api.github.com", "TOKEN@bad_host!"]).apply(to: nil, environment: [:])
        }
        let text = found.joined(separator: "\n")
        #expect(!text.contains("ss!word") && !text.contains("ghp_abcdef123"), "\(text)")
        #expect(found.contains { $0.hasPrefix("--secret DB=…@…: what follows the last '@'") }, "\(text)")
        #expect(found.contains { $0.hasPrefix("--secret …@api.github.com: ") }, "\(text)")
        // With no value in the argument, the host is echoed as a file's would be.
        #expect(found.contains { $0.hasPrefix("--secret TOKEN@…: allowed host 'bad_host!'") }, "\(text)")
    }

    @Test func flagsMergeWithAFileAndConflictsNameBothPlaces() throws {
        let yaml = """
            version: 1
            name: worker
            secrets:
              - env: GITHUB_TOKEN
                from_env: GITHUB_TOKEN
                allow_hosts: [api.github.com]
            network:
              on_secret_violation: block-and-log
            guest:
              memory_mib: 256
            """
        let base = try file(yaml)
        // No conflict: another secret, the same action, the same memory.
        var ok = flags(["OTHER@api.other.example"], action: "block-and-log")
        ok.memoryMiB = 256
        ok.vcpus = 2
        let merged = try ok.apply(to: base, environment: environment)
        #expect(merged.secrets.map(\.env) == ["GITHUB_TOKEN", "OTHER"])
        #expect(merged.name == "worker" && merged.guest?.memoryMiB == 256 && merged.guest?.vcpus == 2)

        var clash = flags(["GITHUB_TOKEN@api.github.com"], action: "block")
        clash.memoryMiB = 1024
        clash.name = "other"
        let found = problems { () throws(PolicyError) in try clash.apply(to: base, environment: environment) }
        #expect(
            found.contains("--secret GITHUB_TOKEN@api.github.com: secret 'GITHUB_TOKEN' is also defined at p.yaml:4:5; define it in one place"),
            "\(found)")
        #expect(found.contains("--on-secret-violation block: the policy sets on_secret_violation: block-and-log at p.yaml:8:24; set it in one place"), "\(found)")
        #expect(found.contains("--memory 1024: the policy sets guest.memory_mib: 256 at p.yaml:10:15; set it in one place"), "\(found)")
        #expect(found.contains("--name other: the policy names the sandbox 'worker' at p.yaml:2:7; give the name in one place"), "\(found)")
    }

    @Test func overlappingPlaceholdersAcrossFlagsAndFileAreRefused() throws {
        let found = problems { () throws(PolicyError) in
            try flags(["GITHUB@api.github.com"]).apply(
                to: try! file("version: 1\nsecrets:\n  - env: GITHUB_TOKEN\n    value: v1\n    allow_hosts: [api.github.com]\n"),
                environment: ["GITHUB": "v2"])
        }
        #expect(found.count == 1)
        #expect(found.first?.contains("'$MSB_GITHUB' is a prefix of '$MSB_GITHUB_TOKEN'") == true, "\(found)")
        #expect(found.first?.contains("p.yaml:3:5") == true, "\(found)")
        let twice = problems { () throws(PolicyError) in
            try flags(["A=one@a.example", "A=two@b.example"]).apply(to: nil, environment: [:])
        }
        #expect(twice == ["--secret A=…@b.example: gives 'A' another value than --secret A=…@a.example"])
    }

    @Test func aDocumentIsCheckedLikeAFileWithoutPositions() {
        let document = PolicyDocument.map([
            ("version", .int(1)), ("name", .string("has space")),
            ("secrets", .list([.map([("env", .string("T")), ("value", .string("null")), ("allow_hosts", .strings([]))])])),
            ("network", .map([("on_secret_violation", .string("bloc"))])),
        ])
        let found = problems { () throws(PolicyError) in try PolicyLoader(environment: [:]).load(document: document, origin: "sdk") }
        #expect(
            found == [
                "sdk: name may contain only letters, digits, '-' and '_'",
                "sdk: secret 'T' has no allowed host: add allow_hosts or allow_host_patterns (or allow_any_host_dangerous: true to accept the risk)",
                "sdk: on_secret_violation must be one of block, block-and-log, block-and-terminate; found 'bloc'; did you mean 'block'?",
            ], "\(found)")
        // A quoted "null" is a value, as in a file.
        let valid = PolicyDocument.map([
            ("version", .int(1)), ("secrets", .list([.map([("env", .string("T")), ("value", .string("null")), ("allow_hosts", .strings(["a.example"]))])])),
        ])
        #expect(problems { () throws(PolicyError) in try PolicyLoader(environment: [:]).load(document: valid, origin: "sdk") }.isEmpty)
    }
}
