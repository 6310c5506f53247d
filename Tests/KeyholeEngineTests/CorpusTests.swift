import Foundation
import KeyholeEngine
import KeyholePolicy
import Testing

/// Request streams under Fixtures/corpus, each with the context it is sent in (`.args`,
/// the `keyhole rewrite` flags) and the exact upstream bytes expected (`.out`).
enum Corpus {
    static let directory: String = {
        var url = URL(fileURLWithPath: #filePath)
        url.deleteLastPathComponent()
        return url.path + "/Fixtures/corpus"
    }()

    static let cases: [String] = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [])
        .filter { $0.hasSuffix(".http") }.map { String($0.dropLast(5)) }.sorted()

    static func bytes(_ name: String, _ ext: String) throws -> [UInt8] {
        Array(try Data(contentsOf: URL(fileURLWithPath: "\(directory)/\(name).\(ext)")))
    }

    static func identity(_ name: String) throws -> ConnectionIdentity {
        let args = String(decoding: try bytes(name, "args"), as: UTF8.self).split(whereSeparator: \.isWhitespace).map(String.init)
        let sni = args[args.firstIndex(of: "--sni")! + 1]
        let plain = args.contains("--plain")
        let unverified = args.contains("unverified")
        let pinned: Set<String> = args.contains("--no-dns-pin") ? [] : [sni]
        return ConnectionIdentity(sni: plain ? nil : sni, dnsPinnedNames: pinned, upstreamVerified: !plain && !unverified)
    }
}

@Suite("Engine corpus")
struct CorpusTests {
    let policy: Policy

    init() throws {
        policy = try PolicyLoader(environment: [:]).load(file: Corpus.directory + "/policy.yaml")
    }

    @Test func theCorpusIsThere() {
        #expect(Corpus.cases.count >= 15)
    }

    @Test(arguments: Corpus.cases)
    func producesExactlyTheExpectedUpstreamBytes(_ name: String) throws {
        let input = try Corpus.bytes(name, "http")
        let expected = try Corpus.bytes(name, "out")
        let identity = try Corpus.identity(name)
        var reference: Run?
        for chunk in [1, 7, 65536] {
            let run = rewrite(bytes: input, secrets: policy.secrets, identity: identity, chunk: chunk, upgrade: true)
            #expect(run.bytes == expected, "\(name), chunk \(chunk)")
            if let reference { #expect(run.events == reference.events, "\(name), chunk \(chunk)") }
            reference = run
            let blocked = run.status == .blocked
            let text = String(decoding: run.bytes, as: UTF8.self)
            // Real values appear only where the context allows them (substitution events).
            let substituted = Set(run.substitutions.map(\.0))
            for secret in policy.secrets where !substituted.contains(secret.env) {
                #expect(!text.contains(String(decoding: secret.value.bytes, as: UTF8.self)), "\(name): \(secret.env) leaked")
            }
            if blocked {
                // Nothing after the point of detection: no configured placeholder went out.
                for secret in policy.secrets {
                    #expect(!text.contains(secret.placeholder + "|") && !text.hasSuffix(secret.placeholder), "\(name)")
                }
            }
        }
    }
}
