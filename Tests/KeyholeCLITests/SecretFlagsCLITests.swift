import Foundation
import Testing

/// `keyhole run` and `keyhole proxy` with `--secret ENV@HOST` and friends: bad flags and
/// conflicts with a file are usage errors (exit 2) that name both places; inline values
/// are never echoed; `--help` says where a value given inline can be seen.
@Suite("Secret flags")
struct SecretFlagsCLITests {
    func write(_ yaml: String) throws -> String {
        let path = NSTemporaryDirectory() + "kh-flags-\(UUID().uuidString.prefix(8)).yaml"
        try yaml.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test func badFlagsExitTwoWithTheFlagAndNeverTheInlineValue() throws {
        let result = try CLI.run(
            ["run", "--state-dir", "/tmp/kh-flags-state", "--secret", "TOKEN=inline-secret-123@bad_host!", "--secret", "NOHOST",
             "--on-secret-violation", "explode", "--", "true"])
        #expect(result.status == 2, "\(result.all)")
        #expect(result.stderr.contains("--secret TOKEN=…@…: what follows the last '@' is not a list of host names"), "\(result.stderr)")
        #expect(result.stderr.contains("--secret NOHOST: must be ENV@HOST[,HOST…] or ENV=VALUE@HOST[,HOST…]"))
        #expect(result.stderr.contains("--on-secret-violation explode: on_secret_violation must be one of"))
        #expect(!result.all.contains("inline-secret-123"))
    }

    @Test func aFlagThatContradictsTheFileNamesBothPlaces() throws {
        let path = try write(
            """
            version: 1
            secrets:
              - env: TOKEN
                value: file-value
                allow_hosts: [api.example.com]
            network:
              on_secret_violation: block
            """)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let result = try CLI.run(
            ["run", "--state-dir", "/tmp/kh-flags-state", path, "--secret", "TOKEN@api.example.com", "--on-secret-violation", "block-and-log", "--",
             "true"],
            environment: ["TOKEN": "env-value"])
        #expect(result.status == 2, "\(result.all)")
        #expect(result.stderr.contains("--secret TOKEN@api.example.com: secret 'TOKEN' is also defined at \(path):3:5; define it in one place"), "\(result.stderr)")
        #expect(result.stderr.contains("--on-secret-violation block-and-log: the policy sets on_secret_violation: block at \(path):7:24"), "\(result.stderr)")
        #expect(!result.all.contains("env-value") && !result.all.contains("file-value"))
        // keyhole proxy takes the same flags, with the same checks.
        let proxy = try CLI.run(["proxy", "--listen", "127.0.0.1:0", "--policy", path, "--secret", "TOKEN@api.example.com"], environment: ["TOKEN": "x"])
        #expect(proxy.status == 2 && proxy.stderr.contains("secret 'TOKEN' is also defined at \(path):3:5"), "\(proxy.all)")
        let missing = try CLI.run(["proxy", "--listen", "127.0.0.1:0"])
        #expect(missing.status != 0 && missing.stderr.contains("missing --policy FILE (or flags: --secret ENV@HOST)"), "\(missing.all)")
    }

    @Test func helpDocumentsTheFormsAndWhereAnInlineValueShows() throws {
        for command in ["run", "proxy"] {
            let help = try CLI.run([command, "--help"]).stdout.replacingOccurrences(of: "\n", with: " ")
                .split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
            #expect(help.contains("--secret <env@host>"), "\(help)")
            #expect(help.contains("anyone who can list processes (ps) sees it"), "\(help)")
            #expect(help.contains("--secret-pattern <env@*.domain>") && help.contains("--on-secret-violation <action>"))
        }
    }
}
