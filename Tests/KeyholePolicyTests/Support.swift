import Foundation

enum Paths {
    /// The repository root, found from this file's location.
    static let root: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()

    static let invalidFixtures = root + "/Tests/KeyholePolicyTests/Fixtures/invalid"
    static let policies = root + "/policies"

    static func files(in directory: String, withExtension ext: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [])
            .filter { $0.hasSuffix("." + ext) }
            .sorted()
    }
}

/// Values the example policies read with from_env; made up, and asserted never to be printed.
let exampleEnvironment = [
    "GITHUB_TOKEN": "ghp_example0000000000000000000000000000",
    "OPENAI_API_KEY": "sk-example-0000000000000000",
    "MAPS_API_KEY": "maps-example-key-0000",
    "DEMO_API_TOKEN": "demo-real-token-0000",
    "HOME": "/root",
]
