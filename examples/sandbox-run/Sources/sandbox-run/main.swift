// sandbox-run: one secret, one command, in a Keyhole sandbox; or the drop-in appliance.
//
//   export GITHUB_TOKEN=ghp_…
//   sandbox-run GITHUB_TOKEN api.github.com -- sh -c 'curl -sS -H "Authorization: Bearer $GITHUB_TOKEN" https://api.github.com/user'
//
// The guest sees GITHUB_TOKEN=$MSB_GITHUB_TOKEN; Keyhole puts the real value (read here from
// the host's $GITHUB_TOKEN) into requests to api.github.com only. Each further `-- COMMAND`
// runs after the one before, in the same sandbox (files stay).
//
//   sandbox-run --appliance tap0 GITHUB_TOKEN api.github.com
//
// guards an existing VM's interface instead (Appliance.builder): prints ENV=PLACEHOLDER for
// the guest, runs until SIGINT or SIGTERM, then removes its rules.
//
// Options before the secret:
//   --state-dir DIR     the sandbox CA and image cache (default $KEYHOLE_STATE_DIR or /var/lib/keyhole)
//   --name NAME         the sandbox's name (default sandbox-run)
//   --upstream-ca FILE  an extra trust root for upstream servers
//   --dns IP            the resolver the guest's DNS goes to
//   --audit-log FILE    audit events as JSON lines (default: none; a summary is printed)
//   --appliance IFACE   guard this interface instead of booting a sandbox
//   --gateway CIDR      with --appliance: the address to put on it (10.0.2.1/30)
// Exit status: the last command's; 2 usage; 1 the sandbox could not start; 4 block-and-terminate.
import Dispatch
import Foundation
import Keyhole

func fail(_ message: String, status: Int32) -> Never {
    FileHandle.standardError.write(Data("sandbox-run: \(message)\n".utf8))
    exit(status)
}

func say(_ message: String) { FileHandle.standardError.write(Data("sandbox-run: \(message)\n".utf8)) }

var arguments = Array(CommandLine.arguments.dropFirst())
let dashes = arguments.firstIndex(of: "--")
let commands = dashes.map { arguments[($0 + 1)...].split(separator: "--", omittingEmptySubsequences: false).map(Array.init) } ?? []
if let dashes { arguments = Array(arguments[..<dashes]) }
var options: [String: String] = [:]
while let first = arguments.first, first.hasPrefix("--") {
    guard arguments.count >= 2 else { fail("\(first) needs a value", status: 2) }
    options[String(first.dropFirst(2))] = arguments[1]
    arguments.removeFirst(2)
}
let usage = "usage: sandbox-run [options] ENV HOST -- COMMAND... [-- COMMAND...]  or  sandbox-run --appliance IFACE [options] ENV HOST"
guard arguments.count == 2 else { fail(usage, status: 2) }
guard options["appliance"] != nil || (!commands.isEmpty && !commands.contains(where: \.isEmpty)) else { fail(usage, status: 2) }
let (env, host) = (arguments[0], arguments[1])
guard let value = ProcessInfo.processInfo.environment[env], !value.isEmpty else {
    fail("the host's $\(env) is not set: it holds the real value", status: 2)
}

let (upstreamCA, dns, gateway) = (options["upstream-ca"], options["dns"], options["gateway"])

/// The network both modes share: the secret, block-and-log, trust roots, resolver.
func configure(_ network: NetworkBuilder) -> NetworkBuilder {
    network.secret { $0.env(env).value(value).allowHost(host) }.onSecretViolation(.blockAndLog)
    if let upstreamCA { network.upstreamCA(upstreamCA) }
    if let dns { network.dns(dns) }
    if let gateway { network.gateway(gateway) }
    return network
}
let audit = options["audit-log"].map { AuditDestination.file($0) } ?? AuditDestination.none

/// Counts the audit events until the stream ends.
func summary(_ events: AsyncStream<AuditEvent>) -> Task<String, Never> {
    Task {
        var counts: [String: Int] = [:]
        for await event in events { counts[event.event, default: 0] += 1 }
        return counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
    }
}

if let interface = options["appliance"] {
    let builder = Appliance.builder(interface: interface).network(configure).auditLog(audit)
    if let name = options["name"] { builder.name(name) }
    if let state = options["state-dir"] { builder.stateDirectory(state) }
    let appliance: Appliance
    do {
        appliance = try await builder.start()
    } catch {
        fail("\(error)", status: 1)
    }
    let counts = summary(appliance.auditEvents)
    FileHandle.standardOutput.write(Data("\(env)=\(appliance.placeholders[env] ?? "?")\n".utf8))
    say("guarding \(interface); the guest must trust \(appliance.caCertificatePath)")
    let (stop, stopped) = AsyncStream<Int32>.makeStream()
    let sources = [SIGINT, SIGTERM].map { number in
        signal(number, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
        // @Sendable: it runs on a dispatch queue, not on the main actor this code is on.
        source.setEventHandler { @Sendable in stopped.yield(number) }
        source.resume()
        return source
    }
    for await _ in stop { break }
    await appliance.stop()
    sources.forEach { $0.cancel() }
    say("stopped; rules removed; audit: \(await counts.value)")
    exit(appliance.terminationReason == nil ? 0 : 4)
}

let builder = Sandbox.builder(options["name"] ?? "sandbox-run").network(configure).auditLog(audit)
if let state = options["state-dir"] { builder.stateDirectory(state) }
let sandbox: Sandbox
do {
    sandbox = try await builder.create()
} catch {
    fail("\(error)", status: 1)
}
let counts = summary(sandbox.auditEvents)
var status: Int32 = 0
do {
    for command in commands {
        let result = try await sandbox.run(command) { output in
            switch output {
            case .stdout(let bytes): FileHandle.standardOutput.write(Data(bytes))
            case .stderr(let bytes): FileHandle.standardError.write(Data(bytes))
            }
        }
        status = result.exitCode
    }
} catch SandboxError.terminated(let reason) {
    say("block-and-terminate: \(reason)")
    status = 4
} catch {
    say("\(error)")
    status = 1
}
await sandbox.stop()
say("audit: \(await counts.value)")
exit(status)
