// The TLS side of BRIEF §6: a cold leaf forge (a certificate for a name never seen before,
// signed by the sandbox CA) in < 200 µs. Every iteration forges for a new name; the figure
// is per forge (1,000 forges per sample).
import Benchmark
import Foundation
import KeyholeTLS

let forge: LeafForge = {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("keyhole-bench-ca-\(getpid())").path
    guard let ca = try? SandboxCA.loadOrCreate(stateDirectory: directory), let forge = try? LeafForge(ca: ca) else {
        fatalError("cannot create the sandbox CA in \(directory)")
    }
    try? FileManager.default.removeItem(atPath: directory)
    return forge
}()

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .mallocCountTotal], timeUnits: .microseconds, warmupIterations: 2,
        scalingFactor: .kilo, maxDuration: .seconds(5), maxIterations: 100)

    Benchmark("leaf-forge-cold") { benchmark in
        let base = Int.random(in: 0..<1_000_000_000)
        for iteration in benchmark.scaledIterations {
            blackHole(try? forge.forge("host-\(base)-\(iteration).bench.test"))
        }
    }
}
