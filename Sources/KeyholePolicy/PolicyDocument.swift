import Yams

/// A policy written as values instead of YAML text, in the file's own keys
/// (`["version": 1, "secrets": [...]]`). The Swift SDK's builders and the command line's
/// `--secret` flags produce one, and `PolicyLoader.load(document:origin:)` validates it with
/// the very checks and messages a file gets; only the positions are missing.
public enum PolicyDocument: Sendable {
    case string(String)
    case int(Int)
    case bool(Bool)
    case list([PolicyDocument])
    case map([(key: String, value: PolicyDocument)])

    /// The YAML node the reader walks. Strings are double-quoted scalars, so that a value
    /// such as `null`, `yes` or `""` stays a string, as it would in quotes in a file.
    var node: Node {
        switch self {
        case .string(let text): return .scalar(Node.Scalar(text, Tag(.str), .doubleQuoted))
        case .int(let number): return .scalar(Node.Scalar(String(number), Tag(.int), .plain))
        case .bool(let flag): return .scalar(Node.Scalar(flag ? "true" : "false", Tag(.bool), .plain))
        case .list(let elements): return .sequence(Node.Sequence(elements.map(\.node)))
        case .map(let entries):
            return .mapping(Node.Mapping(entries.map { (Node.scalar(Node.Scalar($0.key, Tag(.str), .plain)), $0.value.node) }))
        }
    }

    /// `.list` of strings.
    public static func strings(_ values: [String]) -> PolicyDocument { .list(values.map(PolicyDocument.string)) }
}
