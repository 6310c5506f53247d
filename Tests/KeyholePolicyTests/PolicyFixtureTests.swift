import Foundation
import KeyholePolicy
import Testing

@Suite("Policy files")
struct PolicyFixtureTests {
    @Test("every example policy in policies/ is valid", arguments: Paths.files(in: Paths.policies, withExtension: "yaml"))
    func examplePolicyIsValid(_ name: String) throws {
        let policy = try PolicyLoader(environment: exampleEnvironment).load(file: Paths.policies + "/" + name)
        #expect(policy.version == 1)
        #expect(!policy.secrets.isEmpty)
        for secret in policy.secrets {
            #expect(!secret.allowedHosts.isEmpty)
        }
    }

    @Test("there are at least four example policies")
    func enoughExamples() {
        #expect(Paths.files(in: Paths.policies, withExtension: "yaml").count >= 4)
    }

    @Test(
        "each invalid fixture produces exactly its expected diagnostics",
        arguments: Paths.files(in: Paths.invalidFixtures, withExtension: "yaml"))
    func invalidFixture(_ name: String) throws {
        let expectedPath = Paths.invalidFixtures + "/" + name.replacingOccurrences(of: ".yaml", with: ".expected")
        let expected = try String(contentsOfFile: expectedPath, encoding: .utf8)
            .split(separator: "\n").map(String.init)
        #expect(!expected.isEmpty, "fixture \(name) needs a non-empty .expected file")
        let yaml = try String(contentsOfFile: Paths.invalidFixtures + "/" + name, encoding: .utf8)
        var environment = exampleEnvironment
        environment["KEYHOLE_FIXTURE_UNSET_VARIABLE"] = nil
        do {
            _ = try PolicyLoader(environment: environment).load(yaml: yaml, file: name, baseDirectory: Paths.invalidFixtures)
            Issue.record("\(name) was accepted")
        } catch {
            #expect(error.diagnostics.map(\.description) == expected)
            for diagnostic in error.diagnostics {
                #expect(!diagnostic.description.contains("fixture-secret"), "a diagnostic quoted a secret value")
            }
        }
    }
}
