import Foundation
import KeyholeEngine
import KeyholePolicy
import Testing

/// Inputs the fuzzer (fuzz/, scripts/fuzz.sh) once broke, replayed with the fuzzer's own
/// invariants: the first byte picks the context and split, the rest is the guest stream;
/// output and events must not depend on the split.
@Suite("Fuzz regressions")
struct FuzzRegressionTests {
    static let directory: String = {
        var url = URL(fileURLWithPath: #filePath)
        url.deleteLastPathComponent()
        return url.path + "/Fixtures/fuzz-regressions"
    }()

    static let inputs = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { $0.hasSuffix(".bin") }.sorted()

    @Test(arguments: inputs)
    func replays(_ name: String) throws {
        let data = Array(try Data(contentsOf: URL(fileURLWithPath: Self.directory + "/" + name)))
        let stream = Array(data.dropFirst())
        let whole = rewrite(bytes: stream, secrets: [token], chunk: nil, upgrade: true)
        for chunk in 1...8 {
            let split = rewrite(bytes: stream, secrets: [token], chunk: chunk, upgrade: true)
            #expect(split.bytes == whole.bytes, "\(name) chunk \(chunk)")
            #expect(split.events == whole.events, "\(name) chunk \(chunk)")
        }
    }
}
