// sandbox-run: one secret, one command, in a Keyhole sandbox.
//
//   export GITHUB_TOKEN=ghp_…
//   sandbox-run GITHUB_TOKEN api.github.com -- sh -c 'curl -sS -H "Authorization: Bearer $GITHUB_TOKEN" https://api.github.com/user'
//
// The guest sees GITHUB_TOKEN=$MSB_GITHUB_TOKEN; Keyhole puts the real value (read here from
// the host's $GITHUB_TOKEN) into requests to api.github.com only. Each further `-- COMMAND`
// runs after the one before, in the same sandbox (files stay). Options before the secret:
//   --state-dir DIR     the sandbox CA and image cache (default $KEYHOLE_STATE_DIR or /var/lib/keyhole)
//   --name NAME         the sandbox's name (default sandbox-run)
//   --upstream-ca FILE  an extra trust root for upstream servers
//   --dns IP            the resolver the guest's DNS goes to
//   --audit-log FILE    audit events as JSON lines (default: none; a summary is printed)
// Exit status: the last command's; 2 usage; 1 the sandbox could not start; 4 block-and-terminate.
import Foundation
import Keyhole

func fail(_ message: String, status: Int32) -> Never {
    FileHandle.standardError.write(Data("sandbox-run: \(message)\n".utf8))
    exit(status)
}

var arguments = Array(CommandLine.arguments.dropFirst())
guard let dashes = arguments.firstIndex(of: "--"), dashes + 1 < arguments.count else {
    fail("usage: sandbox-run [--state-dir DIR] [--name NAME] [--upstream-ca FILE] [--dns IP] [--audit-log FILE] ENV HOST -- COMMAND...", status: 2)
}
let commands = arguments[(dashes + 1)...].split(separator: "--", omittingEmptySubsequences: false).map(Array.init)
guard !commands.contains(where: \.isEmpty) else { fail("every -- needs a command after it", status: 2) }
arguments = Array(arguments[..<dashes])
var options: [String: String] = [:]
while let first = arguments.first, first.hasPrefix("--") {
    guard arguments.count >= 2 else { fail("\(first) needs a value", status: 2) }
    options[String(first.dropFirst(2))] = arguments[1]
    arguments.removeFirst(2)
}
guard arguments.count == 2 else { fail("give the secret's ENV and its HOST before --", status: 2) }
let (env, host) = (arguments[0], arguments[1])
guard let value = ProcessInfo.processInfo.environment[env], !value.isEmpty else {
    fail("the host's $\(env) is not set: it holds the real value", status: 2)
}

var builder = Sandbox.builder(options["name"] ?? "sandbox-run")
    .secret { $0.env(env).value(value).allowHost(host) }
    .network { network in
        network.onSecretViolation(.blockAndLog)
        if let ca = options["upstream-ca"] { network.upstreamCA(ca) }
        if let dns = options["dns"] { network.dns(dns) }
        return network
    }
    .auditLog(options["audit-log"].map { .file($0) } ?? AuditDestination.none)
if let state = options["state-dir"] { builder = builder.stateDirectory(state) }

let sandbox: Sandbox
do {
    sandbox = try await builder.create()
} catch {
    fail("\(error)", status: 1)
}
let events = Task {
    var counts: [String: Int] = [:]
    for await event in sandbox.auditEvents { counts[event.event, default: 0] += 1 }
    return counts
}
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
    FileHandle.standardError.write(Data("sandbox-run: block-and-terminate: \(reason)\n".utf8))
    status = 4
} catch {
    FileHandle.standardError.write(Data("sandbox-run: \(error)\n".utf8))
    status = 1
}
await sandbox.stop()
let counts = await events.value
FileHandle.standardError.write(Data("sandbox-run: audit: \(counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))\n".utf8))
exit(status)
