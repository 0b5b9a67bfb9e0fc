//! The procedural macros of flame-rt. Use them through the `flame` crate (`#[flame::task]`,
//! `#[flame::main]`); generated code names flame-rt only through its hidden `__private` module.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned};
use syn::parse::Parser;
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::{FnArg, ItemFn, LitInt, LitStr, Pat, ReturnType, Type};

/// Turns an `async fn` into a FLAME task. See `flame::task`.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    let original: TokenStream2 = item.clone().into();
    match expand_task(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        // Keep the item so the rest of the crate still type-checks and IDEs keep working.
        Err(e) => {
            let err = e.to_compile_error();
            quote!(#original #err).into()
        }
    }
}

/// `#[tokio::test]` for code that uses `ProcessBackend`: the test binary is its own runner.
/// See `flame::test`.
#[proc_macro_attribute]
pub fn test(attr: TokenStream, item: TokenStream) -> TokenStream {
    let original: TokenStream2 = item.clone().into();
    match expand_main(attr.into(), item.into(), Entry::Test) {
        Ok(tokens) => tokens.into(),
        Err(e) => {
            let err = e.to_compile_error();
            quote!(#original #err).into()
        }
    }
}

/// `#[tokio::main]` plus runner mode. See `flame::main`.
#[proc_macro_attribute]
pub fn main(attr: TokenStream, item: TokenStream) -> TokenStream {
    let original: TokenStream2 = item.clone().into();
    match expand_main(attr.into(), item.into(), Entry::Main) {
        Ok(tokens) => tokens.into(),
        Err(e) => {
            let err = e.to_compile_error();
            quote!(#original #err).into()
        }
    }
}

/// `crate = "..."`, `blocking` (task only), plus the options only `main` takes.
#[derive(Default)]
struct Options {
    krate: Option<syn::Path>,
    blocking: bool,
    flavor: Option<LitStr>,
    worker_threads: Option<LitInt>,
    graceful_shutdown: Option<syn::LitBool>,
}

fn parse_options(attr: TokenStream2, allow_runtime: bool) -> syn::Result<Options> {
    let mut options = Options::default();
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("crate") {
            let lit: LitStr = meta.value()?.parse()?;
            options.krate = Some(lit.parse()?);
            Ok(())
        } else if !allow_runtime && meta.path.is_ident("blocking") {
            options.blocking = true;
            Ok(())
        } else if allow_runtime && meta.path.is_ident("flavor") {
            let lit: LitStr = meta.value()?.parse()?;
            if lit.value() != "multi_thread" && lit.value() != "current_thread" {
                return Err(syn::Error::new(
                    lit.span(),
                    "flavor is \"multi_thread\" or \"current_thread\"",
                ));
            }
            options.flavor = Some(lit);
            Ok(())
        } else if allow_runtime && meta.path.is_ident("worker_threads") {
            options.worker_threads = Some(meta.value()?.parse()?);
            Ok(())
        } else if allow_runtime && meta.path.is_ident("graceful_shutdown") {
            options.graceful_shutdown = Some(meta.value()?.parse()?);
            Ok(())
        } else if allow_runtime {
            Err(meta.error("unknown option: #[flame::main] takes crate, flavor, worker_threads and graceful_shutdown"))
        } else {
            Err(meta.error("unknown option: #[flame::task] takes `blocking` and `crate = \"...\"`"))
        }
    });
    parser.parse2(attr)?;
    Ok(options)
}

fn krate(options: &Options) -> TokenStream2 {
    match &options.krate {
        Some(path) => quote!(#path),
        None => quote!(::flame),
    }
}

/// Finds what a task argument or return type cannot be: borrowed, or `impl Trait`.
struct Forbidden(Option<syn::Error>);

impl<'ast> Visit<'ast> for Forbidden {
    fn visit_type_reference(&mut self, r: &'ast syn::TypeReference) {
        self.0.get_or_insert_with(|| {
            if generic_arg(&r.elem, "State").is_some() {
                return syn::Error::new(
                    r.span(),
                    "take `State<T>` by value: it is already a shared handle, found in the process that runs the task",
                );
            }
            syn::Error::new(
                r.span(),
                "task arguments are sent to another process: use an owned type (String, Vec<T>, PathBuf, ...) instead of a reference",
            )
        });
    }

    fn visit_lifetime(&mut self, l: &'ast syn::Lifetime) {
        if l.ident != "static" {
            self.0.get_or_insert_with(|| {
                syn::Error::new(
                    l.span(),
                    "task arguments must be 'static: they cannot borrow",
                )
            });
        }
    }

    fn visit_type_impl_trait(&mut self, t: &'ast syn::TypeImplTrait) {
        self.0.get_or_insert_with(|| {
            syn::Error::new(
                t.span(),
                "`impl Trait` cannot be sent to a runner: name a concrete Serialize + Deserialize type",
            )
        });
    }
}

/// A `State<..>` anywhere inside `ty`.
fn find_state(ty: &Type) -> Option<&Type> {
    struct Find<'a>(Option<&'a Type>);
    impl<'ast> Visit<'ast> for Find<'ast> {
        fn visit_type(&mut self, ty: &'ast Type) {
            if self.0.is_none() && generic_arg(ty, "State").is_some() {
                self.0 = Some(ty);
            }
            syn::visit::visit_type(self, ty);
        }
    }
    let mut find = Find(None);
    find.visit_type(ty);
    find.0
}

fn check_type(ty: &Type) -> syn::Result<()> {
    let mut forbidden = Forbidden(None);
    forbidden.visit_type(ty);
    forbidden.0.map_or(Ok(()), Err)
}

/// The single generic argument of `ty` if it is the path type `name<..>` (by last segment).
fn generic_arg<'a>(ty: &'a Type, name: &str) -> Option<&'a Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != name {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    args.args.iter().find_map(|arg| match arg {
        syn::GenericArgument::Type(ty) => Some(ty),
        _ => None,
    })
}

fn is_u8(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none() && p.path.is_ident("u8"))
}

/// `Vec<u8>`, `Box<[u8]>`, or one of them in an `Option`: types serde writes byte by byte, which
/// the generated code encodes as one byte string instead (the same bytes on the wire).
fn is_byte_vec(ty: &Type) -> bool {
    if let Some(inner) = generic_arg(ty, "Option") {
        return is_byte_vec(inner);
    }
    if let Some(elem) = generic_arg(ty, "Vec") {
        return is_u8(elem);
    }
    matches!(generic_arg(ty, "Box"), Some(Type::Slice(slice)) if is_u8(&slice.elem))
}

/// A type named `Bytes`, without generics: decoded through `Shared`, which slices a
/// `bytes::Bytes` out of the call's arguments instead of copying it (any other type named
/// `Bytes` decodes as usual).
fn is_bytes(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none()
        && p.path.segments.last().is_some_and(|last| last.ident == "Bytes" && last.arguments.is_empty()))
}

/// `(T, E)` of a return type `Result<T, E>` whose `T` is a byte vector.
fn byte_vec_result(ty: &Type) -> Option<(&Type, &Type)> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut types = args.args.iter().filter_map(|arg| match arg {
        syn::GenericArgument::Type(ty) => Some(ty),
        _ => None,
    });
    let (ok, err) = (types.next()?, types.next()?);
    is_byte_vec(ok).then_some((ok, err))
}

fn expand_task(attr: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    let options = parse_options(attr, false)?;
    let krate = krate(&options);
    let func: ItemFn = syn::parse2(item)?;
    let sig = &func.sig;
    check_task_signature(sig)?;
    let Params {
        idents,
        types,
        states,
        all_idents,
    } = Params::of(sig)?;
    let ret = return_type(sig)?;
    let name = &sig.ident;
    let name_str = name.to_string();
    let vis = &func.vis;
    let attrs = &func.attrs;
    let inputs = &sig.inputs;
    let block = &func.block;
    let signature_text = quote!((#(#types),*) -> #ret).to_string();
    let arg_asserts = types.iter().map(|ty| {
        quote_spanned! {ty.span()=> #krate::__private::assert_arg::<#ty>(); }
    });
    let ret_assert = quote_spanned! {ret.span()=> #krate::__private::assert_ret::<#ret>(); };
    let private = quote!(#krate::__private);
    // `blocking`: the body runs on Tokio's blocking pool, so heavy work holds no worker.
    let run_body = |idents: &[syn::Ident]| {
        if options.blocking {
            quote!(#private::run_blocking(__flame_body(#(#idents),*)))
        } else {
            quote!(__flame_body(#(#idents),*))
        }
    };
    let local_body = run_body(&all_idents);
    // `State<T>` parameters are found where the task runs: in this process for a local await
    // (a missing one panics: there is no error to return), on the runner for a remote call.
    let state_idents: Vec<_> = states.iter().map(|(ident, _)| ident).collect();
    let state_types: Vec<_> = states.iter().map(|(_, ty)| ty).collect();
    let state_asserts = state_types.iter().map(|ty| {
        quote_spanned! {ty.span()=> #krate::__private::assert_state::<#ty>(); }
    });
    let local_future = if states.is_empty() {
        quote!(::std::boxed::Box::pin(#local_body))
    } else {
        quote!(::std::boxed::Box::pin(async move {
            #(let #state_idents = #private::local_state::<#state_types>().await;)*
            #local_body.await
        }))
    };
    let remote_states =
        quote!(#(let #state_idents = #private::task_state::<#state_types>().await?;)*);
    // Trait-bound errors on the argument tuple point at the argument list, not the attribute.
    let args_span = if sig.inputs.is_empty() {
        sig.ident.span()
    } else {
        sig.inputs.span()
    };
    let new_call = respan(
        quote!(#krate::__private::new_call(&__FLAME_TASK, (#(#idents,)*), __flame_local, __flame_encode, __flame_decode, __flame_culprit)),
        args_span,
    );
    let decode = respan(quote!(#private::decode_args(bytes)?), args_span);
    let encode_body = encode_args_body(&types, &private, args_span);
    let wire_types = wire_types(&types, &private);
    let unwrap_args = idents
        .iter()
        .zip(&types)
        .filter(|(_, ty)| is_bytes(ty))
        .map(|(ident, _)| quote!(let #ident = #ident.0;));
    // In the task's future, first polled once the runner has let go of the reassembled
    // arguments: a byte vector may then take them over (see flame-rt's payload.rs).
    let unwrap_byte_vecs = idents
        .iter()
        .zip(&types)
        .filter(|(_, ty)| is_byte_vec(ty))
        .map(|(ident, _)| quote!(let #ident = #ident.into_inner();));
    let (encode_output, decode_output) = output_codec(&ret, &private);
    let culprit_checks = culprit_checks(&idents, &types, &private);

    // The generated code, as one template read top to bottom: it is one item, and cutting it
    // into functions would scatter that item (this is why `expand_task` passes ~80 lines).
    Ok(quote! {
        #(#attrs)*
        #vis fn #name(#(#idents: #types),*) -> #krate::Call<#ret> {
            #[allow(clippy::all, clippy::pedantic, unused_mut)]
            async fn __flame_body(#inputs) -> #ret #block

            const _: () = {
                #(#arg_asserts)*
                #(#state_asserts)*
                #ret_assert
            };

            fn __flame_local(args: (#(#types,)*)) -> #private::BoxFuture<'static, #ret> {
                let (#(#idents,)*) = args;
                #local_future
            }

            fn __flame_invoke(
                bytes: &[u8],
            ) -> ::core::result::Result<#private::RunningTask, ::std::string::String> {
                let (#(#idents,)*): (#(#wire_types,)*) = #decode;
                #(#unwrap_args)*
                ::core::result::Result::Ok(::std::boxed::Box::pin(async move {
                    #(#unwrap_byte_vecs)*
                    #remote_states
                    let output: #ret = #local_body.await;
                    #encode_output
                }))
            }

            #[allow(unused_variables)]
            fn __flame_encode(
                args: &mut (#(#types,)*),
            ) -> ::core::result::Result<#private::Encoded, #private::PostcardError> {
                #encode_body
            }

            fn __flame_decode(
                bytes: &[u8],
            ) -> ::core::result::Result<#ret, #private::PostcardError> {
                #decode_output
            }

            fn __flame_culprit(args: &(#(#types,)*)) -> &'static str {
                #(#culprit_checks)*
                "an argument"
            }

            static __FLAME_TASK: #private::TaskDef = #private::TaskDef {
                id: ::core::concat!(::core::module_path!(), "::", #name_str),
                sig: #private::sig_hash(#signature_text),
                invoke: __flame_invoke,
            };

            #private::inventory::submit! { #private::Registration(&__FLAME_TASK) }

            #new_call
        }
    })
}

/// What a task's signature must not be: anything but an `async fn` that a runner can call by
/// name (no `const`, `unsafe`, ABI, variadics or generics).
fn check_task_signature(sig: &syn::Signature) -> syn::Result<()> {
    if sig.asyncness.is_none() {
        return Err(syn::Error::new(
            sig.fn_token.span(),
            "#[flame::task] needs an `async fn`",
        ));
    }
    if let Some(c) = &sig.constness {
        return Err(syn::Error::new(c.span(), "a task cannot be a `const fn`"));
    }
    if let Some(u) = &sig.unsafety {
        return Err(syn::Error::new(u.span(), "a task cannot be an `unsafe fn`"));
    }
    if let Some(abi) = &sig.abi {
        return Err(syn::Error::new(
            abi.span(),
            "a task cannot have an `extern` ABI",
        ));
    }
    if let Some(v) = &sig.variadic {
        return Err(syn::Error::new(v.span(), "a task cannot be variadic"));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "a task cannot be generic: its id and signature must be fixed, so the runner knows which body to run",
        ));
    }
    Ok(())
}

/// A task's parameters: serialized arguments, `State<T>` parameters (which are not), and
/// every parameter's name, in order.
struct Params {
    idents: Vec<syn::Ident>,
    types: Vec<Type>,
    states: Vec<(syn::Ident, Type)>,
    all_idents: Vec<syn::Ident>,
}

impl Params {
    fn of(sig: &syn::Signature) -> syn::Result<Params> {
        // Serialized arguments; `State<T>` parameters, which are not; every parameter, in order.
        let mut idents = Vec::new();
        let mut types = Vec::new();
        let mut states: Vec<(syn::Ident, Type)> = Vec::new();
        let mut all_idents = Vec::new();
        for (i, input) in sig.inputs.iter().enumerate() {
            match input {
                FnArg::Receiver(r) => {
                    return Err(syn::Error::new(
                        r.span(),
                        "a task cannot take `self`: make it a free function and pass what it needs as owned arguments",
                    ));
                }
                FnArg::Typed(pt) => {
                    check_type(&pt.ty)?;
                    // Keep the user's name for readable errors; destructuring patterns get one of ours.
                    let ident = match &*pt.pat {
                        Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => {
                            p.ident.clone()
                        }
                        _ => format_ident!("__flame_arg{}", i),
                    };
                    all_idents.push(ident.clone());
                    match generic_arg(&pt.ty, "State") {
                        Some(inner) => states.push((ident, inner.clone())),
                        None => {
                            idents.push(ident);
                            types.push((*pt.ty).clone());
                        }
                    }
                }
            }
        }
        Ok(Params {
            idents,
            types,
            states,
            all_idents,
        })
    }
}

/// The task's return type (`()` if none); a `State` may not be returned.
fn return_type(sig: &syn::Signature) -> syn::Result<Type> {
    Ok(match &sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => {
            check_type(ty)?;
            if let Some(state) = find_state(ty) {
                return Err(syn::Error::new(
                    state.span(),
                    "a task cannot return a `State`: state stays in the process that provided it; return the data itself",
                ));
            }
            (**ty).clone()
        }
    })
}

/// The body of `__flame_encode`: byte vectors cross as one byte string, and the first big one
/// (or `Bytes`) from its own memory (see flame-rt's payload/). Without bytes among them, the
/// arguments are encoded as one tuple: one size pass and one buffer, what the smallest calls
/// are fastest with.
fn encode_args_body(types: &[Type], private: &TokenStream2, args_span: Span) -> TokenStream2 {
    let has_bytes = types.iter().any(|ty| is_byte_vec(ty) || is_bytes(ty));
    let encode_steps = types.iter().enumerate().map(|(i, ty)| {
        let index = syn::Index::from(i);
        let step = if is_byte_vec(ty) {
            quote!(__flame_writer.byte_vec(&mut args.#index)?;)
        } else if is_bytes(ty) {
            quote!(__flame_writer.shared(&args.#index)?;)
        } else {
            quote!(__flame_writer.value(&args.#index)?;)
        };
        respan(step, ty.span())
    });
    if has_bytes {
        quote! {
            let mut __flame_writer = #private::ArgsWriter::default();
            #(#encode_steps)*
            ::core::result::Result::Ok(__flame_writer.finish())
        }
    } else {
        let refs = (0..types.len()).map(|i| {
            let index = syn::Index::from(i);
            quote!(&args.#index)
        });
        respan(quote!(#private::encode_args(&(#(#refs,)*))), args_span)
    }
}

/// The types the runner decodes the arguments as: byte vectors through `FromBytes`, `Bytes`
/// through `Shared`.
fn wire_types(types: &[Type], private: &TokenStream2) -> Vec<TokenStream2> {
    types
        .iter()
        .map(|ty| {
            if is_byte_vec(ty) {
                quote!(#private::FromBytes<#ty>)
            } else if is_bytes(ty) {
                quote!(#private::Shared<#ty>)
            } else {
                quote!(#ty)
            }
        })
        .collect()
}

/// How the task's result is encoded on the runner and decoded by the caller: a byte-vector,
/// byte-vector `Ok` or `Bytes` result takes the fast path.
fn output_codec(ret: &Type, private: &TokenStream2) -> (TokenStream2, TokenStream2) {
    if is_byte_vec(ret) {
        (
            quote!(#private::encode_body(output)),
            quote!(#private::decode_value::<#private::FromBytes<#ret>>(bytes).map(|b| b.into_inner())),
        )
    } else if let Some((ok, err)) = byte_vec_result(ret) {
        (
            quote!(#private::encode_body_or(output)),
            quote!(
                #private::decode_value::<::core::result::Result<#private::FromBytes<#ok>, #err>>(bytes)
                    .map(|r| r.map(|b| b.into_inner()))
            ),
        )
    } else if is_bytes(ret) {
        (
            quote!(#private::encode_shared(output)),
            quote!(#private::decode_value::<#ret>(bytes)),
        )
    } else {
        (
            quote!(#private::encode_result(&output)),
            quote!(#private::decode_value::<#ret>(bytes)),
        )
    }
}

/// `__flame_culprit`'s checks: the first argument that does not encode, by name and type.
fn culprit_checks<'a>(
    idents: &'a [syn::Ident],
    types: &'a [Type],
    private: &'a TokenStream2,
) -> impl Iterator<Item = TokenStream2> + 'a {
    idents
        .iter()
        .zip(types)
        .enumerate()
        .map(move |(i, (ident, ty))| {
            let index = syn::Index::from(i);
            let label = format!("argument `{}: {}`", ident, quote!(#ty))
                .replace(" <", "<")
                .replace("< ", "<")
                .replace(" >", ">");
            let encodes = respan(quote!(#private::encodes(&args.#index)), ty.span());
            quote! {
                if !#encodes {
                    return #label;
                }
            }
        })
}

/// Gives every token the span `span`, so errors about generated code point at the user's code.
fn respan(tokens: TokenStream2, span: Span) -> TokenStream2 {
    tokens
        .into_iter()
        .map(|mut tt| {
            if let proc_macro2::TokenTree::Group(g) = &tt {
                let mut group = proc_macro2::Group::new(g.delimiter(), respan(g.stream(), span));
                group.set_span(span);
                tt = proc_macro2::TokenTree::Group(group);
            } else {
                tt.set_span(span);
            }
            tt
        })
        .collect()
}

/// What `expand_main` makes: an app's `main`, or a test that can be its own runner.
#[derive(Clone, Copy, PartialEq)]
enum Entry {
    Main,
    Test,
}

fn expand_main(attr: TokenStream2, item: TokenStream2, entry: Entry) -> syn::Result<TokenStream2> {
    let options = parse_options(attr, true)?;
    let what = match entry {
        Entry::Main => "#[flame::main]",
        Entry::Test => "#[flame::test]",
    };
    let krate = krate(&options);
    let func: ItemFn = syn::parse2(item)?;
    let sig = &func.sig;
    if sig.asyncness.is_none() {
        return Err(syn::Error::new(
            sig.fn_token.span(),
            format!("{what} needs an `async fn`"),
        ));
    }
    if !sig.inputs.is_empty() {
        return Err(syn::Error::new(
            sig.inputs.span(),
            format!("{what} takes no arguments"),
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            format!("{what} cannot be generic"),
        ));
    }
    // Like tokio: an app gets the multi-threaded runtime, a test the current-thread one.
    let current_thread = match &options.flavor {
        Some(flavor) => flavor.value() == "current_thread",
        None => entry == Entry::Test,
    };
    let mut builder = if current_thread {
        quote!(#krate::__private::tokio::runtime::Builder::new_current_thread())
    } else {
        quote!(#krate::__private::tokio::runtime::Builder::new_multi_thread())
    };
    if let Some(n) = &options.worker_threads {
        if current_thread {
            return Err(syn::Error::new(
                n.span(),
                "worker_threads does not apply to the current_thread flavor",
            ));
        }
        builder = quote!({ let mut b = #builder; b.worker_threads(#n); b });
    }
    let ret: Type = match &sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => (**ty).clone(),
    };
    let attrs = &func.attrs;
    let vis = &func.vis;
    let name = &sig.ident;
    let block = &func.block;
    let output = &sig.output;
    let graceful = options.graceful_shutdown.as_ref().is_none_or(|b| b.value);
    if entry == Entry::Test && options.graceful_shutdown.is_some() {
        return Err(syn::Error::new(
            Span::call_site(),
            "graceful_shutdown applies to #[flame::main] only",
        ));
    }
    let run = match entry {
        Entry::Main => quote!(#krate::__private::run_main(#builder, #graceful, body)),
        Entry::Test => quote! {
            #krate::__private::run_test(::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)), #builder, body)
        },
    };
    let test_attr = (entry == Entry::Test).then(|| quote!(#[::core::prelude::v1::test]));
    let span = Span::call_site();
    Ok(quote_spanned! {span=>
        #test_attr
        #(#attrs)*
        #vis fn #name() #output {
            let body = async move #block;
            let body = ::core::pin::pin!(body);
            // Names the output type, so `?` in the body knows what to convert errors into.
            let body: ::core::pin::Pin<&mut dyn ::core::future::Future<Output = #ret>> = body;
            #run
        }
    })
}
