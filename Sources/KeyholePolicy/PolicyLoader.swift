import Yams

/// Reads a policy file (BRIEF §3) into a `Policy`, collecting every problem as
/// `FILE:LINE:COL: message` instead of stopping at the first.
///
/// Real secret values are loaded here (`from_env`, `from_file`, `value`) and go only into
/// `SecretValue`, whose every textual form is a redaction. No message built here quotes the
/// content of a `value:` scalar, a secret file or an environment variable.
public struct PolicyLoader: Sendable {
    /// The environment `from_env` reads. Defaults to the process environment.
    public var environment: [String: String]

    public init(environment: [String: String]? = nil) {
        self.environment = environment ?? ProcessEnvironment.current()
    }

    /// Loads and validates the policy at `path` (relative paths inside it resolve against
    /// the file's directory).
    public func load(file path: String) throws(PolicyError) -> Policy {
        let bytes: [UInt8]
        do {
            bytes = try FileBytes.readFile(path, limit: 4 << 20)
        } catch {
            throw .invalid([
                PolicyDiagnostic(SourceLocation(file: path, line: 1, column: 1), "cannot read the policy file: \(error.reason)")
            ])
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw .invalid([
                PolicyDiagnostic(SourceLocation(file: path, line: 1, column: 1), "the policy file is not valid UTF-8")
            ])
        }
        return try load(yaml: text, file: path, baseDirectory: FileBytes.directory(of: path))
    }

    public func load(yaml: String, file: String, baseDirectory: String = ".") throws(PolicyError) -> Policy {
        let reader = PolicyReader(file: file, baseDirectory: baseDirectory, environment: environment)
        let policy = reader.read(yaml: yaml)
        let errors = reader.diagnostics.filter { $0.severity == .error }
        guard errors.isEmpty, var policy else {
            throw .invalid(PolicyReader.sorted(errors.isEmpty ? reader.diagnostics : errors))
        }
        policy.warnings = PolicyReader.sorted(reader.diagnostics.filter { $0.severity == .warning })
        return policy
    }

    /// Validates a policy given as values (the SDK's builders, the command line's flags)
    /// with the same checks and messages as a file. `origin` stands where a file's
    /// `FILE:LINE:COL` would (`--secret GITHUB_TOKEN@api.github.com: …`); relative paths
    /// resolve against `baseDirectory`.
    public func load(document: PolicyDocument, origin: String, baseDirectory: String = ".") throws(PolicyError) -> Policy {
        let reader = PolicyReader(file: origin, baseDirectory: baseDirectory, environment: environment, positioned: false)
        let policy = reader.read(root: document.node)
        let errors = reader.diagnostics.filter { $0.severity == .error }
        guard errors.isEmpty, var policy else {
            throw .invalid(errors.isEmpty ? reader.diagnostics : errors)
        }
        policy.warnings = reader.diagnostics.filter { $0.severity == .warning }
        return policy
    }
}

enum ProcessEnvironment {
    static func current() -> [String: String] {
        var result: [String: String] = [:]
        var pointer = environ
        while let entry = pointer.pointee {
            let string = String(cString: entry)
            if let equals = string.firstIndex(of: "=") {
                result[String(string[..<equals])] = String(string[string.index(after: equals)...])
            }
            pointer += 1
        }
        return result
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The keys each mapping of the format accepts, in documentation order.
enum Schema {
    static let root = ["version", "name", "secrets", "network", "guest"]
    static let secret = [
        "env", "from_env", "from_file", "value", "placeholder", "allow_hosts", "allow_host_patterns",
        "allow_any_host_dangerous", "require_tls_identity", "inject", "passthrough_hosts", "passthrough_host_patterns",
        "on_violation",
    ]
    static let inject = ["headers", "basic_auth", "query", "body"]
    static let network = ["on_secret_violation", "block_response", "upstream_ca", "tls_bypass", "egress", "gateway", "dns"]
    static let egress = ["default", "allow", "deny"]
    static let guest = ["image", "kernel", "initrd", "disk", "cmdline", "memory_mib", "vcpus", "accel", "env", "command"]
}

/// One pass over the YAML tree. A class so the helpers can share the diagnostics list.
final class PolicyReader {
    let file: String
    let baseDirectory: String
    let environment: [String: String]
    /// False for a `PolicyDocument`: its nodes have no position, so diagnostics name only
    /// the origin and say "earlier" where a file's would say "at line N".
    let positioned: Bool
    private(set) var diagnostics: [PolicyDiagnostic] = []
    /// Where the file set the keys the command line can also set (see `Policy.keyLocations`).
    private(set) var keyLocations: [String: SourceLocation] = [:]

    init(file: String, baseDirectory: String, environment: [String: String], positioned: Bool = true) {
        self.file = file
        self.baseDirectory = baseDirectory
        self.environment = environment
        self.positioned = positioned
    }

    static func sorted(_ list: [PolicyDiagnostic]) -> [PolicyDiagnostic] {
        var seen = Set<PolicyDiagnostic>()
        return list.enumerated()
            .sorted { a, b in
                (a.element.location.line, a.element.location.column, a.offset)
                    < (b.element.location.line, b.element.location.column, b.offset)
            }
            .map(\.element)
            .filter { seen.insert($0).inserted }
    }

    // MARK: - Diagnostics helpers

    func location(_ node: Node?) -> SourceLocation {
        guard positioned else { return SourceLocation(file: file, line: 0, column: 0) }
        guard let mark = node?.mark else { return SourceLocation(file: file, line: 1, column: 1) }
        return SourceLocation(file: file, line: mark.line, column: mark.column)
    }

    /// " at line N" for a file, "" for a document (which has no lines).
    func atLine(_ node: Node) -> String { positioned ? " at line \(location(node).line)" : "" }

    func record(_ key: String, _ node: Node) { keyLocations[key] = location(node) }

    func error(_ node: Node?, _ message: String) {
        diagnostics.append(PolicyDiagnostic(location(node), message))
    }

    func warning(_ node: Node?, _ message: String) {
        diagnostics.append(PolicyDiagnostic(location(node), message, severity: .warning))
    }

    /// "a mapping", "a list", "a number", … — the kind, never the content.
    func kind(_ node: Node) -> String {
        switch node {
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        case .scalar:
            if node.null != nil { return "nothing (null)" }
            if node.bool != nil { return "a boolean" }
            if node.int != nil || node.float != nil { return "a number" }
            return "a string"
        }
    }

    // MARK: - Typed access

    struct Fields {
        var values: [String: Node] = [:]
        var keyNodes: [String: Node] = [:]
        /// Keys that were misspelt or repeated; checks for missing keys stay quiet then.
        var rejectedKeys = 0
        subscript(_ key: String) -> Node? { values[key] }
    }

    /// Checks `node` is a mapping whose keys are all in `allowed`; unknown keys get a hint.
    func fields(_ node: Node, _ what: String, allowed: [String]) -> Fields? {
        guard case .mapping(let mapping) = node else {
            error(node, "\(what) must be a mapping, found \(kind(node))")
            return nil
        }
        var result = Fields()
        for (keyNode, valueNode) in mapping {
            guard case .scalar(let scalar) = keyNode, keyNode.null == nil else {
                error(keyNode, "keys in \(what) must be plain words, found \(kind(keyNode))")
                continue
            }
            let key = scalar.string
            if let first = result.keyNodes[key] {
                error(keyNode, "duplicate key '\(key)' in \(what) (first given\(atLine(first)))")
                result.rejectedKeys += 1
                continue
            }
            guard allowed.contains(key) else {
                if let hint = Suggestion.closest(to: key, in: allowed) {
                    error(keyNode, "unknown key '\(key)' in \(what); did you mean '\(hint)'?")
                } else {
                    error(keyNode, "unknown key '\(key)' in \(what); expected one of: \(allowed.joined(separator: ", "))")
                }
                result.rejectedKeys += 1
                continue
            }
            result.keyNodes[key] = keyNode
            result.values[key] = valueNode
        }
        return result
    }

    func string(_ node: Node, _ what: String) -> String? {
        guard case .scalar(let scalar) = node, node.null == nil else {
            error(node, "\(what) must be a string, found \(kind(node))")
            return nil
        }
        return scalar.string
    }

    func bool(_ node: Node, _ what: String) -> Bool? {
        guard case .scalar = node, let value = node.bool else {
            error(node, "\(what) must be true or false, found \(kind(node))")
            return nil
        }
        return value
    }

    func int(_ node: Node, _ what: String, range: ClosedRange<Int>) -> Int? {
        guard case .scalar = node, let value = node.int else {
            error(node, "\(what) must be a whole number, found \(kind(node))")
            return nil
        }
        guard range.contains(value) else {
            error(node, "\(what) must be between \(range.lowerBound) and \(range.upperBound), found \(value)")
            return nil
        }
        return value
    }

    /// A list of strings; each element is returned with its node for precise locations.
    func stringList(_ node: Node, _ what: String) -> [(String, Node)] {
        guard case .sequence(let sequence) = node else {
            if node.null != nil { return [] }
            error(node, "\(what) must be a list (for example [a, b]), found \(kind(node))")
            return []
        }
        var result: [(String, Node)] = []
        for element in sequence {
            if let value = string(element, "each entry of \(what)") { result.append((value, element)) }
        }
        return result
    }

    func oneOf<T: RawRepresentable & CaseIterable>(_ node: Node, _ what: String, _: T.Type) -> T? where T.RawValue == String {
        guard let text = string(node, what) else { return nil }
        if let value = T(rawValue: text) { return value }
        let options = T.allCases.map(\.rawValue)
        var message = "\(what) must be one of \(options.joined(separator: ", ")); found '\(text)'"
        if let hint = Suggestion.closest(to: text, in: options) { message += "; did you mean '\(hint)'?" }
        error(node, message)
        return nil
    }

    // MARK: - Document

    func read(yaml: String) -> Policy? {
        let root: Node?
        do {
            root = try Yams.compose(yaml: yaml)
        } catch let yamlError as YamlError {
            reportYAML(yamlError, yaml: yaml)
            return nil
        } catch {
            diagnostics.append(PolicyDiagnostic(location(nil), "cannot parse YAML"))
            return nil
        }
        return read(root: root)
    }

    func read(root: Node?) -> Policy? {
        guard let root, root.null == nil else {
            error(nil, "the policy file is empty; it needs at least \"version: 1\"")
            return nil
        }
        guard let top = fields(root, "the policy", allowed: Schema.root) else { return nil }

        var version = 1
        if let node = top["version"] {
            if let value = int(node, "version", range: Int.min...Int.max) {
                if value != 1 {
                    error(node, "unsupported policy version \(value); this keyhole understands version 1")
                }
                version = value
            }
        } else {
            error(root, "missing required key 'version' (add \"version: 1\")")
        }

        var name = PolicyReader.defaultName(forFile: file)
        if let node = top["name"], let value = string(node, "name") {
            record("name", node)
            if let problem = PolicyReader.nameProblem(value) {
                error(node, "name \(problem)")
            } else {
                name = value
            }
        }

        let secrets = top["secrets"].map(readSecrets) ?? []
        let network = top["network"].flatMap(readNetwork) ?? NetworkPolicy()
        let guest = top["guest"].flatMap { readGuest($0, secrets: secrets) }

        var policy = Policy(version: version, name: name, secrets: secrets, network: network, guest: guest, file: file)
        policy.keyLocations = keyLocations
        return policy
    }

    func reportYAML(_ yamlError: YamlError, yaml: String) {
        // libyaml's own messages name the problem and position; the snippet Yams would add
        // is left out because it can contain a `value:`.
        switch yamlError {
        case .scanner(let context, let problem, let mark, _), .parser(let context, let problem, let mark, _),
            .composer(let context, let problem, let mark, _):
            var message = "YAML syntax error: \(problem)"
            if let context { message += " (\(context.text) at line \(context.mark.line))" }
            diagnostics.append(PolicyDiagnostic(SourceLocation(file: file, line: mark.line, column: mark.column), message))
        case .reader(let problem, let offset, _, _):
            var line = 1
            var column = 1
            if let offset {
                for byte in yaml.utf8.prefix(offset) {
                    if byte == 0x0A {
                        line += 1
                        column = 1
                    } else if byte & 0xC0 != 0x80 {
                        column += 1
                    }
                }
            }
            diagnostics.append(
                PolicyDiagnostic(SourceLocation(file: file, line: line, column: column), "cannot read YAML: \(problem)"))
        default:
            diagnostics.append(PolicyDiagnostic(location(nil), "cannot parse YAML"))
        }
    }

    static func defaultName(forFile file: String) -> String {
        var base = file.split(separator: "/").last.map(String.init) ?? "keyhole"
        if let dot = base.lastIndex(of: ".") { base = String(base[..<dot]) }
        let cleaned = String(base.lowercased().map { $0.isLetter || $0.isNumber || $0 == "-" ? $0 : "-" }.prefix(32))
        return nameProblem(cleaned) == nil ? cleaned : "keyhole"
    }

    static func nameProblem(_ name: String) -> String? {
        if name.isEmpty { return "must not be empty" }
        if name.utf8.count > 32 { return "must be at most 32 characters (it names the sandbox's TAP and state)" }
        let ok = name.utf8.allSatisfy { b in
            (b >= 0x61 && b <= 0x7A) || (b >= 0x41 && b <= 0x5A) || (b >= 0x30 && b <= 0x39) || b == 0x2D || b == 0x5F
        }
        if !ok { return "may contain only letters, digits, '-' and '_'" }
        if name.hasPrefix("-") { return "must not start with '-'" }
        return nil
    }

    // MARK: - Secrets

    struct Seen {
        var line: Int
        var node: Node
    }

    func readSecrets(_ node: Node) -> [Secret] {
        guard case .sequence(let sequence) = node else {
            if node.null != nil { return [] }
            error(node, "secrets must be a list of secrets (each starting with '- env: NAME'), found \(kind(node))")
            return []
        }
        var secrets: [Secret] = []
        var envs: [String: Node] = [:]
        var placeholders: [(String, Node)] = []
        for element in sequence {
            guard let parsed = readSecret(element) else { continue }
            let (secret, envNode, placeholderNode) = parsed
            if let first = envs[secret.env] {
                error(envNode, "secret env '\(secret.env)' is already defined\(atLine(first))")
                continue
            }
            envs[secret.env] = envNode
            var clash = false
            for (other, otherNode) in placeholders {
                if other == secret.placeholder {
                    error(placeholderNode, "placeholder '\(secret.placeholder)' is already used\(atLine(otherNode))")
                    clash = true
                } else if secret.placeholder.hasPrefix(other) || other.hasPrefix(secret.placeholder) {
                    let (short, long) = other.count < secret.placeholder.count ? (other, secret.placeholder) : (secret.placeholder, other)
                    error(
                        placeholderNode,
                        "placeholder '\(secret.placeholder)' and '\(other)'\(positioned ? " (line \(location(otherNode).line))" : "") overlap: '\(short)' is a prefix of '\(long)'; give one of them a distinct 'placeholder'"
                    )
                    clash = true
                }
            }
            placeholders.append((secret.placeholder, placeholderNode))
            if !clash { secrets.append(secret) }
        }
        return secrets
    }

    /// Returns the secret plus the nodes later checks point at.
    func readSecret(_ node: Node) -> (Secret, Node, Node)? {
        guard let f = fields(node, "a secret", allowed: Schema.secret) else { return nil }
        var ok = true

        var env = ""
        let envNode = f["env"] ?? node
        if let envValue = f["env"] {
            if let value = string(envValue, "env") {
                if let problem = PolicyReader.envNameProblem(value) {
                    error(envValue, "env '\(value)' \(problem)")
                    ok = false
                } else {
                    env = value
                }
            } else {
                ok = false
            }
        } else {
            error(node, "a secret needs 'env' (the guest environment variable that receives the placeholder)")
            ok = false
        }

        // Placeholder.
        var placeholder = env.isEmpty ? "" : Secret.defaultPlaceholder(forEnv: env)
        let placeholderNode = f["placeholder"] ?? envNode
        if let p = f["placeholder"] {
            if let value = string(p, "placeholder") {
                if let problem = PolicyReader.placeholderProblem(value) {
                    error(p, "placeholder \(problem)")
                    ok = false
                } else {
                    placeholder = value
                }
            } else {
                ok = false
            }
        }

        // Value source: exactly one of from_env, from_file, value.
        let sourceKeys = ["from_env", "from_file", "value"].filter { f[$0] != nil }
        var value: SecretValue?
        var source = SecretSource.inline
        if sourceKeys.isEmpty {
            error(node, "secret '\(env)' needs exactly one of from_env, from_file or value (where the real value comes from)")
            ok = false
        } else if sourceKeys.count > 1 {
            error(f[sourceKeys[1]], "secret '\(env)' has both '\(sourceKeys[0])' and '\(sourceKeys[1])'; give exactly one source")
            ok = false
        } else if let n = f["from_env"] {
            if let name = string(n, "from_env") {
                source = .environment(name)
                value = loadFromEnvironment(name, node: n)
            }
        } else if let n = f["from_file"] {
            if let path = string(n, "from_file") {
                let resolved = FileBytes.resolve(path, relativeTo: baseDirectory)
                source = .file(resolved)
                value = loadFromFile(path: resolved, shownAs: path, node: n)
            }
        } else if let n = f["value"] {
            if let text = string(n, "value") {
                if text.isEmpty {
                    error(n, "value is empty")
                } else {
                    value = SecretValue(text)
                }
            }
        }
        if let bytes = value?.bytes, let n = f[sourceKeys.first ?? "value"] {
            if bytes.contains(where: { $0 < 0x20 || $0 == 0x7F }) {
                error(n, "the real value of '\(env)' contains a control character (such as a line break); it could not be sent safely in a header")
                value = nil
            } else if !placeholder.isEmpty, PolicyReader.contains(Array(placeholder.utf8), bytes) {
                error(placeholderNode, "the placeholder of '\(env)' contains its real value; the guest would see the credential")
                value = nil
            }
        }
        if value == nil { ok = false }

        // Hosts.
        let diagnosticsBeforeHosts = diagnostics.count
        let exact = hostNames(f["allow_hosts"], "allow_hosts", what: "allowed host", ok: &ok).map(\.name)
        let patterns = hostPatterns(f["allow_host_patterns"], "allow_host_patterns", ok: &ok)
        var anyHost = false
        if let n = f["allow_any_host_dangerous"], let flag = bool(n, "allow_any_host_dangerous") {
            anyHost = flag
            if flag {
                warning(n, "secret '\(env)' may be substituted for any host that asks for it; prefer allow_hosts")
            }
        }
        // Stay quiet when the hosts were given but wrong, or a key was misspelt: the error
        // already printed is the one to fix.
        let hostsWereRejected = diagnostics.count > diagnosticsBeforeHosts || f.rejectedKeys > 0
        if exact.isEmpty && patterns.isEmpty && !anyHost && !hostsWereRejected {
            error(
                node,
                "secret '\(env)' has no allowed host: add allow_hosts or allow_host_patterns (or allow_any_host_dangerous: true to accept the risk)"
            )
            ok = false
        }

        var requireTLS = true
        if let n = f["require_tls_identity"], let flag = bool(n, "require_tls_identity") {
            requireTLS = flag
            if !flag {
                warning(n, "secret '\(env)' may be substituted over plain HTTP, where anyone on the path can read it")
            }
        }

        var inject = Injection()
        if let n = f["inject"], let i = fields(n, "inject", allowed: Schema.inject) {
            if let b = i["headers"].flatMap({ bool($0, "inject.headers") }) { inject.headers = b }
            if let b = i["basic_auth"].flatMap({ bool($0, "inject.basic_auth") }) { inject.basicAuth = b }
            if let b = i["query"].flatMap({ bool($0, "inject.query") }) { inject.query = b }
            if let b = i["body"].flatMap({ bool($0, "inject.body") }) { inject.body = b }
        }

        // Where the placeholder may go unchanged (never the value).
        var passExact: [String] = []
        for (host, hostNode) in hostNames(f["passthrough_hosts"], "passthrough_hosts", what: "passthrough host", ok: &ok) {
            if exact.contains(host) || patterns.contains(where: { $0.matches(normalizedHost: host) }) {
                error(hostNode, "'\(hostNode.string ?? host)' is both an allowed host and a passthrough host of '\(env)': it gets the value; remove it from one of them")
                ok = false
            } else {
                passExact.append(host)
            }
        }
        let passPatterns = hostPatterns(f["passthrough_host_patterns"], "passthrough_host_patterns", ok: &ok)
        var onViolation: ViolationAction?
        if let n = f["on_violation"] {
            onViolation = oneOf(n, "on_violation", ViolationAction.self)
            if onViolation == nil { ok = false }
        }

        guard ok, let value else { return nil }
        let secret = Secret(
            env: env, placeholder: placeholder, value: value, source: source,
            allowedHosts: HostAllowList(exact: exact, patterns: patterns, anyHost: anyHost),
            requireTLSIdentity: requireTLS, inject: inject,
            passthroughHosts: HostAllowList(exact: passExact, patterns: passPatterns), onViolation: onViolation,
            location: location(node))
        return (secret, envNode, placeholderNode)
    }

    /// The valid host names of a list, normalized, with their nodes; each invalid one is
    /// reported (`what` names the list's role) and clears `ok`.
    func hostNames(_ node: Node?, _ key: String, what: String, ok: inout Bool) -> [(name: String, node: Node)] {
        guard let node else { return [] }
        var names: [(name: String, node: Node)] = []
        for (host, hostNode) in stringList(node, key) {
            let normalized = HostName.normalize(host)
            if let problem = HostName.problem(with: normalized) {
                error(hostNode, "\(what) '\(host)' \(problem)")
                ok = false
            } else {
                names.append((normalized, hostNode))
            }
        }
        return names
    }

    /// The valid host patterns of a list; each invalid one is reported and clears `ok`.
    func hostPatterns(_ node: Node?, _ key: String, ok: inout Bool) -> [HostPattern] {
        guard let node else { return [] }
        var patterns: [HostPattern] = []
        for (text, patternNode) in stringList(node, key) {
            if let pattern = HostPattern(text) {
                patterns.append(pattern)
            } else {
                error(patternNode, "host pattern '\(text)' \(HostPattern.problem(with: text) ?? "is invalid")")
                ok = false
            }
        }
        return patterns
    }

    func loadFromEnvironment(_ name: String, node: Node) -> SecretValue? {
        if PolicyReader.envNameProblem(name) != nil {
            // Do not echo: a value pasted where a name belongs must not reach a terminal.
            error(node, "from_env must name an environment variable (letters, digits and '_'), not hold the value itself")
            return nil
        }
        // Conventional names (GITHUB_TOKEN) are shown; anything else may be a pasted credential.
        let shown = PolicyReader.looksLikeConventionalName(name) ? "'\(name)'" : "named here"
        guard let text = environment[name] else {
            error(node, "environment variable \(shown) is not set (from_env)")
            return nil
        }
        if text.isEmpty {
            error(node, "environment variable \(shown) is empty (from_env)")
            return nil
        }
        return SecretValue(text)
    }

    func loadFromFile(path: String, shownAs: String, node: Node) -> SecretValue? {
        var bytes: [UInt8]
        do {
            bytes = try FileBytes.readFile(path, limit: 1 << 20)
        } catch {
            self.error(node, "cannot read secret file '\(shownAs)': \(error.reason)")
            return nil
        }
        // Files written by `echo` or editors end in a newline that is not part of the secret.
        if bytes.last == 0x0A { bytes.removeLast() }
        if bytes.last == 0x0D { bytes.removeLast() }
        if bytes.isEmpty {
            error(node, "secret file '\(shownAs)' is empty")
            return nil
        }
        return SecretValue(bytes: bytes)
    }

    static func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
        guard !needle.isEmpty, needle.count <= haystack.count else { return false }
        for start in 0...(haystack.count - needle.count) where haystack[start..<start + needle.count].elementsEqual(needle) {
            return true
        }
        return false
    }

    static func envNameProblem(_ name: String) -> String? {
        guard let first = name.utf8.first else { return "must not be empty" }
        let isLetter = { (b: UInt8) in (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x5F }
        guard isLetter(first), name.utf8.allSatisfy({ isLetter($0) || ($0 >= 0x30 && $0 <= 0x39) }) else {
            return "is not a valid environment variable name (letters, digits and '_', not starting with a digit)"
        }
        if name.utf8.count > 128 { return "is longer than 128 characters" }
        return nil
    }

    static func looksLikeConventionalName(_ name: String) -> Bool {
        name.utf8.count <= 64 && name.utf8.allSatisfy { ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x5F }
    }

    /// Placeholders travel in headers, URLs, JSON and base64; keep them to characters that
    /// survive all of these unchanged so every encoded form can be recognised.
    static func placeholderProblem(_ placeholder: String) -> String? {
        let count = placeholder.utf8.count
        if count < 4 { return "must be at least 4 characters" }
        if count > 128 { return "must be at most 128 characters" }
        let extra: Set<UInt8> = Set("$_-.:@{}[]~^!".utf8)
        for byte in placeholder.utf8 {
            let alnum = (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
            if !alnum && !extra.contains(byte) {
                return "'\(placeholder)' may contain only letters, digits and $ _ - . : @ { } [ ] ~ ^ !"
            }
        }
        if !placeholder.utf8.contains(where: { ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) }) {
            return "'\(placeholder)' must contain a letter"
        }
        return nil
    }

    // MARK: - Network

    func readNetwork(_ node: Node) -> NetworkPolicy? {
        if node.null != nil { return NetworkPolicy() }
        guard let f = fields(node, "network", allowed: Schema.network) else { return nil }
        var network = NetworkPolicy()
        if let n = f["on_secret_violation"], let action = oneOf(n, "on_secret_violation", ViolationAction.self) {
            record("network.on_secret_violation", n)
            network.onSecretViolation = action
        }
        if let n = f["block_response"], let response = oneOf(n, "block_response", BlockResponse.self) {
            network.blockResponse = response
        }
        if let n = f["upstream_ca"] {
            for (path, pathNode) in stringList(n, "upstream_ca") {
                let resolved = FileBytes.resolve(path, relativeTo: baseDirectory)
                do {
                    let bytes = try FileBytes.readFile(resolved, limit: 4 << 20)
                    if !PolicyReader.contains(bytes, Array("-----BEGIN CERTIFICATE-----".utf8)) {
                        error(pathNode, "upstream_ca '\(path)' holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
                    } else {
                        network.upstreamCA.append(resolved)
                    }
                } catch {
                    self.error(pathNode, "cannot read upstream_ca '\(path)': \(error.reason)")
                }
            }
        }
        if let n = f["tls_bypass"] {
            var exact: [String] = []
            var patterns: [HostPattern] = []
            for (text, hostNode) in stringList(n, "tls_bypass") {
                if text.hasPrefix("*.") {
                    if let pattern = HostPattern(text) {
                        patterns.append(pattern)
                    } else {
                        error(hostNode, "tls_bypass pattern '\(text)' \(HostPattern.problem(with: text) ?? "is invalid")")
                    }
                } else {
                    let host = HostName.normalize(text)
                    if let problem = HostName.problem(with: host) {
                        error(hostNode, "tls_bypass host '\(text)' \(problem)")
                    } else {
                        exact.append(host)
                    }
                }
            }
            network.tlsBypass = HostAllowList(exact: exact, patterns: patterns)
        }
        if let n = f["egress"], let e = fields(n, "network.egress", allowed: Schema.egress) {
            if let d = e["default"], let value = oneOf(d, "egress.default", EgressPolicy.Default.self) {
                network.egress.default = value
            }
            network.egress.allow = e["allow"].map { egressRules($0, "egress.allow") } ?? []
            network.egress.deny = e["deny"].map { egressRules($0, "egress.deny") } ?? []
        }
        if let n = f["gateway"], let text = string(n, "gateway") {
            if let address = InterfaceAddress(text) {
                network.gateway = address
            } else {
                error(n, "gateway '\(text)' must be an address with a prefix length, such as 10.0.2.1/30")
            }
        }
        if let n = f["dns"] {
            for (text, dnsNode) in stringList(n, "dns") {
                if let address = IPAddress(text) {
                    network.dns.append(address)
                } else {
                    error(dnsNode, "dns server '\(text)' must be an IP address")
                }
            }
        }
        return network
    }

    func egressRules(_ node: Node, _ what: String) -> [EgressPolicy.Rule] {
        var rules: [EgressPolicy.Rule] = []
        for (text, ruleNode) in stringList(node, what) {
            if text.contains("/") || IPAddress(text) != nil {
                if let network = IPNetwork(text) {
                    rules.append(.network(network))
                } else {
                    error(ruleNode, "\(what) entry '\(text)' is not a valid CIDR block (such as 10.0.0.0/8, with the host bits zero)")
                }
            } else {
                let host = HostName.normalize(text)
                if let problem = HostName.problem(with: host) {
                    error(ruleNode, "\(what) host '\(text)' \(problem)")
                } else {
                    rules.append(.host(host))
                }
            }
        }
        return rules
    }

    // MARK: - Guest

    func readGuest(_ node: Node, secrets: [Secret]) -> GuestSpec? {
        if node.null != nil { return GuestSpec() }
        guard let f = fields(node, "guest", allowed: Schema.guest) else { return nil }
        var guest = GuestSpec()

        func path(_ key: String) -> String? {
            guard let n = f[key], let value = string(n, "guest.\(key)") else { return nil }
            let resolved = FileBytes.resolve(value, relativeTo: baseDirectory)
            if access(resolved, R_OK) != 0 {
                error(n, "cannot read guest \(key) '\(value)': \(FileBytes.errnoMessage())")
            }
            return resolved
        }
        for key in ["image", "kernel", "memory_mib", "vcpus"] { if let n = f[key] { record("guest." + key, n) } }
        let kernel = path("kernel")
        let initrd = path("initrd")
        let disk = path("disk")
        if let n = f["image"], let image = string(n, "guest.image") {
            if image != "builtin" {
                error(n, "guest.image must be 'builtin'; for your own guest give kernel (with initrd or disk) instead")
            } else if f["kernel"] != nil {
                error(n, "guest.image: builtin cannot be combined with kernel; choose one")
            }
        }
        if let kernel {
            guest.image = .kernel(kernel: kernel, initrd: initrd, disk: disk)
        } else if f["initrd"] != nil || f["disk"] != nil {
            error(f["initrd"] ?? f["disk"], "guest.initrd and guest.disk need guest.kernel (direct kernel boot)")
        }
        if let n = f["cmdline"] { guest.cmdline = string(n, "guest.cmdline") }
        if let n = f["memory_mib"], let value = int(n, "guest.memory_mib", range: 64...1_048_576) { guest.memoryMiB = value }
        if let n = f["vcpus"], let value = int(n, "guest.vcpus", range: 1...256) { guest.vcpus = value }
        if let n = f["accel"], let value = oneOf(n, "guest.accel", GuestSpec.Accel.self) { guest.accel = value }
        if let n = f["env"] {
            if case .mapping(let mapping) = n {
                var seen = Set<String>()
                let secretEnvs = Set(secrets.map(\.env))
                for (keyNode, valueNode) in mapping {
                    guard let name = string(keyNode, "a guest.env name") else { continue }
                    if let problem = PolicyReader.envNameProblem(name) {
                        error(keyNode, "guest.env name '\(name)' \(problem)")
                    } else if !seen.insert(name).inserted {
                        error(keyNode, "duplicate key '\(name)' in guest.env")
                    } else if secretEnvs.contains(name) {
                        error(keyNode, "guest.env '\(name)' is also a secret's env; the secret's placeholder goes there")
                    } else if let value = string(valueNode, "guest.env.\(name)") {
                        if let secret = secrets.first(where: { $0.value.occurs(in: value) }) {
                            error(valueNode, "guest.env '\(name)' holds the real value of secret '\(secret.env)'; the guest must see only its placeholder")
                        } else {
                            guest.env.append(EnvironmentEntry(name: name, value: value))
                        }
                    }
                }
            } else if n.null == nil {
                error(n, "guest.env must be a mapping of NAME: value, found \(kind(n))")
            }
        }
        if let n = f["command"] {
            if case .sequence = n {
                let command = stringList(n, "guest.command").map(\.0)
                if command.isEmpty {
                    error(n, "guest.command must not be empty")
                } else {
                    guest.command = command
                }
            } else {
                error(n, "guest.command must be a list, such as [sh, -c, \"curl ...\"], found \(kind(n))")
            }
        }
        return guest
    }
}
