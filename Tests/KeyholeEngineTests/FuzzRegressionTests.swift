import Foundation
import KeyholeEngine
import KeyholePolicy
import NIOCore
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
        if stream.starts(with: "HTTP/1.".utf8) { return try replayResponse(name, stream, selector: data[0]) }
        let whole = rewrite(bytes: stream, secrets: [token], chunk: nil, upgrade: true)
        for chunk in 1...8 {
            let split = rewrite(bytes: stream, secrets: [token], chunk: chunk, upgrade: true)
            #expect(split.bytes == whole.bytes, "\(name) chunk \(chunk)")
            #expect(split.events == whole.events, "\(name) chunk \(chunk)")
        }
    }

    /// A response stream (the fuzzer's response mode): split-independent, no value reaches
    /// the guest with masking on, nothing altered with it off.
    func replayResponse(_ name: String, _ stream: [UInt8], selector: UInt8) throws {
        let secrets = [
            secret("TOKEN", value: "FUZZ-REAL-VALUE"), secret("OTHER", value: "FUZZ-OTHER-VALUE", hosts: ["other.example.com"]),
        ]
        func run(_ chunk: Int?, masking: Bool) -> ([UInt8], [MaskEvent]) {
            let masker = ResponseMasker(secrets: secrets, masking: masking)
            // The requests, as the fuzzer derives them from the first byte.
            for k in 0..<8 {
                switch (Int(selector) >> (k % 4)) & 3 {
                case 1: masker.expect(ExpectedResponse(isHead: true))
                case 2: masker.expect(ExpectedResponse(upgrade: ["websocket"]))
                case 3: masker.expect(ExpectedResponse(isConnect: k == 7))
                default: masker.expect(ExpectedResponse())
                }
            }
            var output = MaskOutput()
            let size = chunk ?? stream.count
            var offset = 0
            while offset < stream.count {
                masker.consume(ByteBuffer(bytes: stream[offset..<min(stream.count, offset + size)]), into: &output)
                offset += size
            }
            masker.finish(into: &output)
            return (output.guest.flatMap { Array($0.readableBytesView) }, output.events)
        }
        for masking in [true, false] {
            let whole = run(nil, masking: masking)
            for chunk in 1...8 {
                let split = run(chunk, masking: masking)
                #expect(split.0 == whole.0, "\(name) chunk \(chunk) masking \(masking)")
                #expect(split.1 == whole.1, "\(name) chunk \(chunk) masking \(masking)")
            }
            let text = String(decoding: whole.0, as: UTF8.self)
            if masking {
                #expect(!text.contains("FUZZ-REAL-VALUE") && !text.contains("FUZZ-OTHER-VALUE"), "\(name)")
            } else {
                #expect(whole.0.elementsEqual(stream.prefix(whole.0.count)), "\(name)")
            }
        }
    }
}
